"""The `twinbid` command: the composition root that ties scenarios, agents and services together."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Digital twins that run a factory by bidding."
)
scenario_app = typer.Typer(no_args_is_help=True, help="Work with scenario files.")
registry_app = typer.Typer(no_args_is_help=True, help="The AAS registry service.")
app.add_typer(scenario_app, name="scenario")
app.add_typer(registry_app, name="registry")
console = Console()
err = Console(stderr=True)


def _load(path: Path):
    from scenarios.loader import ScenarioError, load_scenario

    try:
        scenario = load_scenario(path)
    except ScenarioError as exc:
        err.print(f"[red]invalid scenario[/red]\n{exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    missing = scenario.missing_vendor_keys(os.environ)
    if missing:
        lines = "\n".join(f"{path}: {line}" for line in missing)
        err.print(f"[red]scenario cannot run here[/red]\n{lines}", markup=True, highlight=False)
        raise typer.Exit(2)
    return scenario


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="scenario file (YAML)")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: runs/<scenario name>)")] = None,
    broker: Annotated[str | None, typer.Option(help="broker URL, or 'mosquitto' for a private one")] = None,
    db: Annotated[
        str | None, typer.Option(help="database URL (default: SQLite in the output folder)")
    ] = None,
    processes: Annotated[int, typer.Option(min=1, help="agent processes")] = 1,
    seed: Annotated[int | None, typer.Option(help="random seed (overrides the scenario)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    orders_port: Annotated[
        int, typer.Option(help="port of the order-taking service (scenarios with vendors; 0: any free port)")
    ] = 0,
    resume: Annotated[
        Path | None, typer.Option(help="continue the stopped run in this output folder (same scenario)")
    ] = None,
) -> None:
    """Run a plant from a scenario file and write its record to the output folder."""
    from agents.persistence.runs import RecordError
    from scenarios.launcher import RunOptions, RunStartError
    from scenarios.launcher import run as run_plant
    from scenarios.supervisor import RunStillAlive
    from twinbid.signals import run_stoppable

    sc = _load(scenario)
    # One run per record: the launcher refuses a folder or database that holds another run (or
    # none to resume), and one that another launcher is writing.
    out = resume if resume is not None else out or _fresh(Path("runs") / _slug(sc.name))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncio").addFilter(_GmqttTeardownFilter())
    options = RunOptions(
        out=out,
        broker=broker,
        db=db,
        processes=processes,
        seed=seed,
        progress=not quiet,
        resume=resume is not None,
        orders_port=orders_port,
        on_orders_url=lambda url: err.print(
            f"order-taking service: {url}  (POST /orders, see docs/vendors.md)"
        ),
    )
    # A service manager, `timeout` or `kill` stops a run with SIGTERM: it stops as Ctrl-C does
    # (complete record, private broker and agent processes shut down), not by dying on the spot.
    try:
        result = run_stoppable(run_plant(sc, options))
    except (RunStartError, RecordError) as exc:  # one line: what and where
        err.print(f"twinbid run: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except RunStillAlive as exc:
        err.print(f"[red]cannot resume:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    for notice in result.notices:
        err.print(f"note: {notice}")
    _kpi_table(result.kpis, out)
    if not result.ok:
        raise typer.Exit(1)


class _GmqttTeardownFilter(logging.Filter):
    """gmqtt's protocol tasks raise AttributeError when their connection is torn down mid-read
    (as on Ctrl-C): harmless, but asyncio prints each as a traceback. Keep them at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[2] is not None:
            tb = record.exc_info[2]
            while tb is not None:
                if "gmqtt" in tb.tb_frame.f_code.co_filename:
                    logging.getLogger("gmqtt.teardown").debug("suppressed: %s", record.getMessage())
                    return False
                tb = tb.tb_next
        return True


def _fresh(base: Path) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... so that running the same scenario again never clashes."""
    if not base.exists():
        return base
    n = 2
    while base.with_name(f"{base.name}-{n}").exists():
        n += 1
    return base.with_name(f"{base.name}-{n}")


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def _num(value: float | None) -> str:
    """A figure for the table: two decimals at most (kpis.json keeps full precision)."""
    return "-" if value is None else f"{value:,.2f}".rstrip("0").rstrip(".")


def _kpi_table(k: dict, out: Path) -> None:
    t = Table(title=f"KPIs ({out})", show_header=False)
    p, s = k["products"], k["steps"]
    lat = k["negotiation_latency_ms"]
    rows = [
        ("products", f"{p['completed']}/{p['total']} completed, {p['failed']} failed"),
        ("steps", f"{s['completed']}/{s['total']}"),
        ("makespan (simulated)", f"{k['makespan']:.2f}"),
        ("wall seconds", f"{k['wall_seconds']:.2f}"),
        ("messages", f"{k['messages']['total']} ({_num(k['messages']['per_step'])} per step)"),
        ("negotiation latency ms", f"p50 {_num(lat['p50'])}  p99 {_num(lat['p99'])}"),
        ("flow time mean", _num(k["flow_time"]["mean"])),
        (
            "flow time by priority",
            ", ".join(f"prio {p_}: {_num(v)}" for p_, v in k["flow_time"]["by_priority"].items()),
        ),
        *(
            (
                f"  {ptype}",
                ", ".join(
                    f"prio {p_}: {_num(v['mean'])}" + (f" ({v['late']} late)" if v["late"] else "")
                    for p_, v in by.items()
                ),
            )
            for ptype, by in k["flow_time"].get("by_type_and_priority", {}).items()
        ),
        ("utilisation", ", ".join(f"{r} {u:.0%}" for r, u in k["utilisation"].items())),
    ]
    for a, b in rows:
        t.add_row(a, b)
    console.print(t)


@app.command()
def validate(scenario: Annotated[Path, typer.Argument(help="scenario file (YAML)")]) -> None:
    """Check a scenario file; print what is wrong and where."""
    sc = _load(scenario)
    n = len(sc.product_instances())
    console.print(f"{scenario}: valid — {len(sc.resources)} resources, {n} products, clock {sc.clock.kind}")


@scenario_app.command("from-jobshop")
def from_jobshop(
    instance: Annotated[Path, typer.Argument(help="job-shop instance file")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here instead of stdout")
    ] = None,
    flexible: Annotated[int, typer.Option(help="machines per operation (1 = classic job shop)")] = 1,
    seed: Annotated[int, typer.Option(help="seed for the flexible variant")] = 0,
) -> None:
    """Turn a job-shop instance into a scenario."""
    from scenarios.jobshop import JobShopError, flexible_variant, jobshop_yaml
    from scenarios.loader import dump_scenario

    try:
        text = (
            jobshop_yaml(instance)
            if flexible <= 1
            else dump_scenario(flexible_variant(instance, flexible, seed))
        )
    except (JobShopError, OSError) as exc:
        err.print(f"[red]{exc}[/red]", markup=True)
        raise typer.Exit(2) from None
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@registry_app.command("serve")
def registry_serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    db: Annotated[str | None, typer.Option(help="database URL (default: in-memory SQLite)")] = None,
) -> None:
    """Serve the AAS registry (Part 2 API v3.1) until interrupted."""
    from registry.service import serve_registry

    try:
        asyncio.run(serve_registry(host, port, db))
    except KeyboardInterrupt:
        pass


# --- benchmarks ---------------------------------------------------------------------------------------------------

BENCH_DIR_ENV = "TWINBID_BENCH_DIR"


def bench_dir() -> Path:
    """The repository's ``bench/`` folder: scripts beside the packages, not installed. Found next to the
    source tree of an editable install (or at ``$TWINBID_BENCH_DIR``); FileNotFoundError says what to do."""
    import os

    import twinbid

    given = os.environ.get(BENCH_DIR_ENV)
    folder = Path(given) if given else Path(twinbid.__file__).resolve().parents[1] / "bench"
    if not any(folder.glob("bench_*.py")):
        where = f"${BENCH_DIR_ENV} = {folder}" if given else f"{folder} (beside the twinbid package)"
        raise FileNotFoundError(
            f"no benchmarks in {where}. The benchmarks are scripts in the repository's bench/ folder and are "
            "not installed with the package: run from a checkout installed in editable mode "
            "(python3 -m pip install -e '.[bench]'), or set " + BENCH_DIR_ENV + " to its bench/ folder"
        )
    return folder


def benchmarks(folder: Path) -> dict[str, tuple[Path, str]]:
    """``bench_NAME.py`` in ``folder``: NAME -> (script, first line of its module docstring)."""
    import ast

    found: dict[str, tuple[Path, str]] = {}
    for script in sorted(folder.glob("bench_*.py")):
        try:
            doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        except (OSError, SyntaxError, ValueError):
            doc = ""
        found[script.stem.removeprefix("bench_")] = (script, doc.strip().split("\n", 1)[0])
    return found


def _accepts_json(script: Path) -> bool:
    """Does the benchmark take ``--json``? (Some always end with their JSON line and refuse the option.)"""
    import re

    text = script.read_text(encoding="utf-8")
    return re.search(r"add_argument\(\s*[\"']--json[\"']", text) is not None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Options after NAME that are not twinbid's go to the benchmark; `twinbid bench NAME -- --help` "
    "shows its own. See docs/benchmarks.md.",
)
def bench(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="the benchmark: bench/bench_NAME.py")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the benchmarks and what they measure")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="end with one JSON object of every figure (passed on if it asks)")
    ] = False,
) -> None:
    """Run a benchmark of bench/ with this Python, passing the remaining arguments on."""
    import subprocess

    try:
        folder = bench_dir()
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]", markup=True, highlight=False)
        raise typer.Exit(2) from None
    found = benchmarks(folder)
    if list_ or name is None:
        width = max(len(n) for n in found)
        for n, (_, doc) in found.items():
            sys.stdout.write(f"{n:<{width}}  {doc}".rstrip() + "\n")
        if name is None and not list_:
            err.print("usage: twinbid bench NAME [--json] [ARGS...]   (twinbid bench --list)")
            raise typer.Exit(2)
        return
    if name not in found:
        err.print(
            f"[red]no benchmark {name!r}[/red]; there are: {', '.join(found)}  (twinbid bench --list)",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(2)
    script = found[name][0]
    args = list(ctx.args)
    if args[:1] == ["--"]:
        args = args[1:]
    if as_json and _accepts_json(script) and "--json" not in args:
        args.append("--json")
    # A child process with this Python: the script's `if __name__ == "__main__"` guard and multiprocessing's
    # spawn work as when it is run by hand.
    proc = subprocess.Popen([sys.executable, str(script), *args])
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the benchmark got the Ctrl-C too: let it clean up
        try:
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code if code > 0 else 128 - code)


@app.command()
def verify(
    target: Annotated[Path, typer.Argument(help="a run's output folder, or one product's .aasx")],
) -> None:
    """Check every step record's signature and each product's hash chain, offline.

    Exit 0 when all hold; 1 naming the first broken link of each product (product, step, what);
    2 when there is nothing to check.
    """
    from twinbid.verify_record import verify_aasx, verify_folder

    if target.is_dir():
        count, problems = verify_folder(target)
        if count == 0:
            err.print(f"{target}: no product AASX in {target / 'aas'}; nothing to verify", highlight=False)
            raise typer.Exit(2)
    elif target.is_file():
        count, problems = 1, verify_aasx(target)
    else:
        err.print(f"{target}: no such file or folder", highlight=False)
        raise typer.Exit(2)
    for problem in problems:
        err.print(f"[red]REFUSED[/red] {problem}", markup=True, highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(
        f"verified: {count} product AASX, every step signature and chain link holds", highlight=False
    )


def _mount() -> None:
    """Commands that live in their own modules: observation (log, trace, stats, report, observe)."""
    from twinbid import observe, vendor

    for command in observe.app.registered_commands:
        app.registered_commands.append(command)
    app.add_typer(
        vendor.app, name="vendor", help="Vendors: submit product AASs, serve the order-taking service."
    )
    for command in vendor.app.registered_commands:
        if command.name == "submit" or (command.callback and command.callback.__name__ == "submit"):
            app.registered_commands.append(command)  # `twinbid submit FILE --url --key`, as a vendor types it


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
