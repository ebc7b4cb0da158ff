"""A run owns and supervises its processes (issue 21, findings 4 and 7), with real processes and signals.

* Killing the launcher alone (SIGKILL) ends every process it started: broker, registry, recorder,
  fork server, agent workers. Left running, they went on executing steps beside the run that
  resumed them.
* ``--resume`` refuses while a process of the run still runs.
* SIGTERM stops ``twinbid run`` started in the background of a script (where SIGINT is ignored)
  with a complete record, and ``twinbid vendor serve`` together with its broker.
* The run survives the loss of its own services: its broker, registry and recorder, SIGKILLed
  mid-run, are started again and the plant finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.ordertaking import generate_api_key, hash_api_key
from protocol.lifeline import process_start_ticks
from protocol.mosquitto import free_port

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT / "scenarios" / "chaos.yaml"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "300"}


def twinbid(*args: str, **kwargs) -> subprocess.Popen:
    """``twinbid ARGS`` in a session of its own (so a test can clean up whatever it leaves)."""
    return subprocess.Popen(
        [sys.executable, "-m", "twinbid.cli", *args],
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (read from /proc), children of children included."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_bytes()
                fields = stat[stat.rfind(b")") + 2 :].split()
                if fields[0] != b"Z":
                    parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int], starts: dict[int, int | None]) -> set[int]:
    return {p for p in pids if process_start_ticks(p) is not None and process_start_ticks(p) == starts[p]}


def drained(proc: subprocess.Popen) -> subprocess.Popen:
    """Read ``proc``'s output as it comes. A pipe nobody reads holds 64 KiB; then every process of
    the run that logs to it (launcher, services, workers) blocks in its write, its event loop with
    it, and the run stalls for the test's sake: a registry outage logs that much."""
    proc.said = []  # type: ignore[attr-defined]
    proc.drainer = threading.Thread(target=lambda: proc.said.extend(proc.stdout), daemon=True)  # type: ignore[attr-defined]
    proc.drainer.start()  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen) -> str:
    """What ``proc`` said (all of it once it has ended)."""
    drainer = getattr(proc, "drainer", None)
    if drainer is None:
        return proc.stdout.read()
    drainer.join(30)
    return "".join(proc.said)  # type: ignore[attr-defined]


def wait_until(condition, within: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{output_of(proc)}")
        if time.monotonic() > deadline:
            if proc is not None:  # what the process said so far
                proc.kill()
                pytest.fail(f"not within {within} s: {what}\n{output_of(proc)}")
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.1)


def _working(out: Path) -> bool:
    """Some asset of the run has started a step (its execution log is not empty)."""
    return any('"event":"started"' in log.read_text() for log in out.glob("assets/*.jsonl"))


def _launcher_of(out: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((out / "processes.json").read_text())["launcher"]["pid"]
    return None


def kill_all(pids: set[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_killing_the_launcher_ends_every_process_of_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = twinbid(
        "run", str(CHAOS), "--processes", "3", "--broker", "mosquitto", "--out", str(out), "-q"
    )
    children: set[int] = set()
    try:
        # broker, registry, recorder, fork server (+ resource tracker) and three worker processes
        # (two shares and the warm spare), once the workers have started their agents
        wait_until(
            lambda: (out / "assets").is_dir() and len(descendants(launcher.pid)) >= 8,
            90,
            "the run's processes start",
            launcher,
        )
        time.sleep(2)  # the plant at work
        children = descendants(launcher.pid)
        starts = {p: process_start_ticks(p) for p in children}
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 15
        while alive(children, starts) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(children, starts)
        names = {
            p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if Path(f"/proc/{p}").exists()
        }
        assert not left, f"processes of the killed run still alive: {names}"
    finally:
        kill_all(children)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_resume_refuses_while_a_process_of_the_run_lives(tmp_path: Path) -> None:
    """Refused while the launcher runs; refused while a hung worker (SIGSTOP: its lifeline cannot
    act) outlives a killed launcher; accepted once every process of the run has ended."""
    out = tmp_path / "run"
    first = twinbid("run", str(CHAOS), "--processes", "2", "--out", str(out), "-q")
    worker = None
    try:
        wait_until(lambda: _working(out), 90, "the plant works", first)
        second = twinbid("run", str(CHAOS), "--resume", str(out), "-q")
        output, _ = second.communicate(timeout=90)
        output = " ".join(output.split())
        assert second.returncode == 2, output
        # refused at once by the record's lock, which the live launcher holds
        assert "being written by another twinbid run" in output and f"launcher (pid {first.pid})" in output, (
            output
        )
        assert first.poll() is None  # the running plant is left alone

        roles = json.loads((out / "processes.json").read_text())
        worker = roles["share-1"]["pid"]
        os.kill(worker, signal.SIGSTOP)
        first.kill()
        first.wait(10)
        third = twinbid("run", str(CHAOS), "--resume", str(out), "-q")
        output, _ = third.communicate(timeout=90)
        output = " ".join(output.split())
        assert third.returncode == 2, output
        assert f"share-1 (pid {worker})" in output and "launcher (pid" not in output, output

        os.kill(worker, signal.SIGKILL)
        fourth = twinbid("run", str(CHAOS), "--resume", str(out), "-q")
        try:  # accepted: it registers itself as the run's launcher (then it is stopped, cleanly)
            wait_until(lambda: _launcher_of(out) == fourth.pid, 90, "the resumed run starts", fourth)
            fourth.terminate()
            output, _ = fourth.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fourth.pid, signal.SIGKILL)
        assert (out / "kpis.json").exists(), output
    finally:
        if worker is not None:
            kill_all({worker})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_sigterm_stops_a_run_started_in_the_background_of_a_script(tmp_path: Path) -> None:
    """A non-interactive shell starts `cmd &` with SIGINT ignored; SIGTERM must still stop the run
    with its record written (kpis.json, aas/), every process of the run gone."""
    out = tmp_path / "run"
    script = f"{sys.executable} -m twinbid.cli run {CHAOS} --processes 2 --out {out} -q & echo $!; wait $!; echo exit=$?"
    shell = subprocess.Popen(
        ["bash", "-c", script],
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pid = int(shell.stdout.readline())
        wait_until(lambda: _working(out), 90, "the plant works", shell)
        children = descendants(pid)
        starts = {p: process_start_ticks(p) for p in children}
        os.kill(pid, signal.SIGTERM)
        output, _ = shell.communicate(timeout=120)
        assert "exit=1" in output, output  # stopped before its products were done: not a success
        assert (out / "kpis.json").exists(), output
        assert list((out / "aas").glob("*.aasx")), output
        assert not alive(children, starts)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_sigterm_to_the_whole_group_as_a_service_manager_sends_it(tmp_path: Path) -> None:
    """systemd (KillMode=control-group) sends SIGTERM to every process of the service at once: the
    children leave the stopping to the launcher, which still writes the whole record."""
    out = tmp_path / "run"
    run = twinbid("run", str(CHAOS), "--processes", "2", "--out", str(out), "-q")
    try:
        wait_until(lambda: _working(out), 90, "the plant works", run)
        os.killpg(run.pid, signal.SIGTERM)
        output, _ = run.communicate(timeout=180)
        assert run.returncode == 1, output  # stopped before its products were done
        figures = json.loads((out / "kpis.json").read_text())
        started = {
            json.loads(line)["product"]
            for log in out.glob("assets/*.jsonl")
            for line in log.read_text().splitlines()
            if '"event":"started"' in line
        }
        # every product that had begun has its AASX: no share's process was lost before writing it
        assert started and started <= {p.stem for p in (out / "aas").glob("*.aasx")}, output
        assert figures["recorded_messages"] > 0, figures
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


VENDOR_PLANT = """
name: vendor-plant
namespace: vp
clock: {kind: accelerated, time_scale: 50}
resources:
  - {kind: workstation, name: ws-1, location: a, capabilities: [{name: turning, duration: 2, cost_rate: 2}]}
product_types:
  - name: gear
    plan:
      - {capability: turning}
"""


@pytest.mark.timeout(120)
def test_sigterm_stops_vendor_serve_and_its_broker(tmp_path: Path) -> None:
    (tmp_path / "plant.yaml").write_text(VENDOR_PLANT)
    key_hash = hash_api_key(generate_api_key("acme"))
    (tmp_path / "vendors.yaml").write_text(f'vendors:\n  - name: acme\n    api_key_hash: "{key_hash}"\n')
    serve = twinbid(
        "vendor", "serve", str(tmp_path / "plant.yaml"), "--vendors", str(tmp_path / "vendors.yaml"),
        "--port", str(free_port()), "--out", str(tmp_path / "o"), cwd=tmp_path,
    )  # fmt: skip
    children: set[int] = set()
    try:
        lines: list[str] = []
        while not any("order-taking service at" in line for line in lines):
            line = serve.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        children = descendants(serve.pid)
        assert children, "vendor serve starts its own broker"
        starts = {p: process_start_ticks(p) for p in children}
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        deadline = time.monotonic() + 10
        while alive(children, starts) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(children, starts), "the embedded broker outlived vendor serve"
    finally:
        kill_all(children)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGKILL)


SERVICES = {"broker": ("protocol.embedded_broker", "mosquitto"), "registry": ("registry.process",),
            "recorder": ("protocol.recorder_process",)}  # fmt: skip


def _service_pid(launcher: int, role: str) -> int | None:
    """The pid of the launcher's child that runs ``role``, found by its command line."""
    for pid in descendants(launcher):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if any(word in cmdline for word in SERVICES[role]):
                return pid
    return None


@pytest.mark.slow  # three kills and three restarts: 35-100 s a broker on this machine
@pytest.mark.timeout(400)
@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_a_run_survives_the_loss_of_its_broker_registry_and_recorder(tmp_path: Path, broker: str) -> None:
    """SIGKILL of the run's broker 4 s into the run (the workers are still starting), then of its
    registry and its recorder: each is started again and the plant finishes with kpis.json."""
    out = tmp_path / "run"
    run = drained(twinbid("run", str(CHAOS), "--processes", "2", "--broker", broker, "--out", str(out), "-q"))
    try:
        wait_until(lambda: _service_pid(run.pid, "broker") is not None, 90, "the broker starts", run)
        time.sleep(4)
        for role in ("broker", "registry", "recorder"):
            pid = _service_pid(run.pid, role)
            assert pid is not None, role
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda r=role, p=pid: _service_pid(run.pid, r) not in (None, p),
                90,  # a loaded machine: each restart is a Python process that imports its service
                f"the {role} is back",
                run,
            )
            time.sleep(2)
        run.wait(timeout=360)
        output = output_of(run)
        assert run.returncode == 0, output
        figures = json.loads((out / "kpis.json").read_text())
        assert figures["products"]["completed"] == figures["products"]["total"] == 60
        assert [r["process"] for r in figures["revived"]] == ["broker", "registry", "recorder"]
        # the log has no torn line where the killed recorder stopped writing
        lines = (out / "messages.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


@pytest.mark.timeout(400)
def test_a_run_survives_the_loss_of_its_fork_server(tmp_path: Path) -> None:
    """The fork server's workers take its death for their own (multiprocessing then reports them
    dead): they end with it, their shares are taken over by processes of a new fork server, and
    nothing is lost or done twice."""
    from types import SimpleNamespace

    from test_recovery import check_nothing_lost_nothing_twice

    out = tmp_path / "run"
    run = twinbid("run", str(CHAOS), "--processes", "3", "--broker", "mosquitto", "--out", str(out), "-q")
    try:
        wait_until(lambda: _working(out), 90, "the plant works", run)
        time.sleep(1)
        (forkserver,) = [p for p in descendants(run.pid) if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()
                         and Path(f"/proc/{p}/stat").read_text().split(") ")[1].split()[1] == str(run.pid)]  # fmt: skip
        os.kill(forkserver, signal.SIGKILL)
        output, _ = run.communicate(timeout=360)
        assert run.returncode == 0, output
        figures = json.loads((out / "kpis.json").read_text())
        assert "forkserver" in [r["process"] for r in figures.get("revived", [])], figures.get("revived")
        check_nothing_lost_nothing_twice(out, SimpleNamespace(kpis=figures, chaos_log=[]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
