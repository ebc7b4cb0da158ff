"""`twinbid vendor ...`: submit a product AAS as a vendor, serve the order-taking service, manage API keys.

* ``submit FILE --url URL --key KEY`` — what a vendor runs: uploads an AAS (``.aasx`` or ``.json``), prints the
  order id and status; exit code 1 with the server's messages when the order is refused.
* ``serve SCENARIO --vendors FILE`` — a plant (the scenario's resources) with the order-taking service in front;
  with ``--plant OUT`` (or ``--broker URL --registry URL --no-resources --clock-origin MS``) the service alone,
  taking orders into another process's running plant (``twinbid run``), on that plant's time base.
* ``new-key VENDOR``, ``hash-key``, ``webhook-secret`` — API keys and their hashes for the vendors file.

:class:`VendorPlant` (used by ``serve`` and the tests) is the composition: broker, registry, one node with the
scenario's resources, and the service whose ``on_order`` starts a product twin with :func:`start_product`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from twinbid.signals import run_stoppable

app = typer.Typer(
    no_args_is_help=True, help="Vendors: submit product AASs as orders; serve the order-taking service."
)

EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
AASX_TYPE = "application/asset-administration-shell-package+xml"


def _err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------------------------------------


def _content_type(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix == ".aasx" or (suffix != ".json" and data[:4] == b"PK\x03\x04"):
        return AASX_TYPE
    return "application/json"


def _custom_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def _messages(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return [response.text[:500] or response.reason_phrase]
    out = (
        [str(m.get("text", "")) for m in body.get("messages", []) if isinstance(m, dict)]
        if isinstance(body, dict)
        else []
    )
    return out or [response.text[:500]]


def _post_order(
    client: httpx.Client,
    url: str,
    data: bytes,
    ctype: str,
    params: dict[str, str],
    headers: dict[str, str],
    retries: int = 4,
) -> httpx.Response:
    """POST with retries on connection errors and 502/503/504 — safe, the Idempotency-Key makes it one order."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    class _Transient(Exception):
        def __init__(self, response: httpx.Response) -> None:
            self.response = response

    try:
        for attempt in Retrying(
            stop=stop_after_attempt(retries + 1),
            wait=wait_exponential(multiplier=0.5, max=8),
            retry=retry_if_exception_type((httpx.TransportError, _Transient)),
            reraise=True,
        ):
            with attempt:
                response = client.post(
                    url, content=data, params=params, headers={**headers, "Content-Type": ctype}
                )
                if response.status_code in (502, 503, 504):
                    raise _Transient(response)
                return response
    except _Transient as exc:
        return exc.response
    raise AssertionError("unreachable")  # pragma: no cover


@app.command()
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            help="the product instance's AAS: .aasx package or .json environment",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    url: Annotated[
        str,
        typer.Option(envvar="TWINBID_URL", help="the order-taking service, e.g. https://plant.example:8090"),
    ],
    key: Annotated[str, typer.Option(envvar="TWINBID_API_KEY", help="your API key")],
    product_type: Annotated[
        str | None, typer.Option("--type", help="product type (default: the shell's assetType)")
    ] = None,
    priority: Annotated[
        int | None, typer.Option(help="1 = top priority (earliest) .. 5 = lowest (cheapest)")
    ] = None,
    due: Annotated[
        str | None, typer.Option(help="due date: simulated time, or ISO 8601 date-time with offset")
    ] = None,
    notify: Annotated[str | None, typer.Option(help="webhook URL for progress notifications")] = None,
    customization: Annotated[
        list[str] | None, typer.Option("--set", help="customization NAME=VALUE (repeatable)")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="retry-safe request id (default: a new one)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow the order until it is completed or failed")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the service's JSON answer")] = False,
    retries: Annotated[int, typer.Option(min=0, help="retries on connection errors and 502/503/504")] = 4,
) -> None:
    """Submit a product instance's AAS as a manufacturing order; print the order id and status."""
    data = file.read_bytes()
    params: dict[str, str] = {}
    if product_type:
        params["productType"] = product_type
    if priority is not None:
        params["priority"] = str(priority)
    if due:
        params["due"] = due
    if notify:
        params["notificationUrl"] = notify
    if customization:
        custom = {}
        for item in customization:
            name, eq, value = item.partition("=")
            if not eq or not name:
                _err(f"--set expects NAME=VALUE, got {item!r}")
                raise typer.Exit(EXIT_USAGE)
            custom[name] = _custom_value(value)
        params["customization"] = json.dumps(custom)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=60.0) as client:
            response = _post_order(
                client, f"{base}/orders", data, _content_type(file, data), params, headers, retries
            )
            if response.status_code >= 400:
                _err(f"rejected ({response.status_code}):")
                for text in _messages(response):
                    _err(f"  {text}")
                raise typer.Exit(EXIT_REJECTED)
            receipt = response.json()
            if as_json:
                sys.stdout.write(json.dumps(receipt, indent=2) + "\n")
            else:
                sys.stdout.write(
                    f"order {receipt['orderId']}: {receipt['status']} (product {receipt['product']}, type {receipt['productType']}, priority {receipt['priority']})\n"
                )
            if wait:
                final = _follow(
                    client, base, receipt["orderId"], headers["Authorization"], timeout, quiet=as_json
                )
                if final != "completed":
                    raise typer.Exit(EXIT_REJECTED)
    except httpx.TransportError as exc:
        _err(f"cannot reach {base}: {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None


def _follow(client: httpx.Client, base: str, order_id: str, auth: str, timeout: float, *, quiet: bool) -> str:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    status = ""
    while time.monotonic() < deadline:
        response = client.get(f"{base}/orders/{order_id}", headers={"Authorization": auth})
        if response.status_code == 429:
            time.sleep(float(response.headers.get("retry-after", "1")))
            continue
        response.raise_for_status()
        doc = response.json()
        for event in doc.get("events", []):
            if event["id"] not in seen:
                seen.add(event["id"])
                if not quiet:
                    step = f" step {event['step']}" if event.get("step") is not None else ""
                    sys.stdout.write(f"  {event['type']}{step}\n")
        status = doc["status"]
        if status in ("completed", "failed"):
            if not quiet:
                reason = f": {doc['reason']}" if doc.get("reason") else ""
                sys.stdout.write(f"order {order_id}: {status}{reason}\n")
            return status
        time.sleep(1.0)
    _err(f"order {order_id} still {status} after {timeout:g} s")
    return status


# ---------------------------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------------------------


@app.command("new-key")
def new_key(vendor: Annotated[str, typer.Argument(help="vendor short name ([a-z0-9-]+)")]) -> None:
    """Make a new API key for a vendor; prints the key (give it to the vendor) and the vendors-file entry."""
    from agents.ordertaking.auth import generate_api_key, hash_api_key

    try:
        key = generate_api_key(vendor)
    except ValueError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    sys.stdout.write(f"key (give to the vendor, shown once): {key}\n")
    sys.stdout.write(f'vendors file entry:\n  - name: {vendor}\n    api_key_hash: "{hash_api_key(key)}"\n')


@app.command("hash-key")
def hash_key(
    key: Annotated[
        str | None, typer.Option(envvar="TWINBID_API_KEY", help="the key (default: read from stdin)")
    ] = None,
    method: Annotated[
        str, typer.Option(help="scrypt (default), pbkdf2_sha256 or sha256 (scenario files)")
    ] = "scrypt",
) -> None:
    """Print the salted hash of an API key for the vendors file."""
    from agents.ordertaking.auth import hash_api_key

    key = key or sys.stdin.readline().strip()
    if not key:
        _err("no key given")
        raise typer.Exit(EXIT_USAGE)
    try:
        sys.stdout.write(hash_api_key(key, method=method) + "\n")
    except ValueError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_USAGE) from None


@app.command("webhook-secret")
def webhook_secret(key: Annotated[str, typer.Option(envvar="TWINBID_API_KEY", help="your API key")]) -> None:
    """Print the webhook signing secret derived from an API key (for vendors without a configured secret)."""
    from agents.ordertaking.auth import derive_webhook_secret

    sys.stdout.write(derive_webhook_secret(key) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# the plant behind the service
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlantClock:
    """A plant's clock as another process must copy it: kind, time scale (accelerated: wall ms per unit) and
    ``wall_origin_ms`` (the wall epoch ms of simulated time 0; None: this process's start)."""

    kind: str
    time_scale: float | None = None
    wall_origin_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class PlantInfo:
    """What ``twinbid run`` writes to ``OUT/plant.json`` so that other processes can join the running plant."""

    namespace: str | None
    broker: str | None
    registry: str | None
    clock: PlantClock | None

    @classmethod
    def read(cls, path: Path) -> PlantInfo:
        """Read ``plant.json`` (``path`` is the file or the run's output folder); ValueError if unusable."""
        file = path / "plant.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"{file} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        c = data.get("clock")
        clock = None
        if isinstance(c, dict) and c.get("kind"):
            clock = PlantClock(str(c["kind"]), c.get("time_scale"), c.get("wall_origin_ms"))
        return cls(data.get("namespace"), data.get("broker"), data.get("registry"), clock)

    @staticmethod
    def accounts(path: Path) -> Path | None:
        """The run's broker accounts folder (``OUT/broker``), if its broker has accounts (the
        default when `twinbid run` starts it); ``path`` as for :meth:`read`."""
        from protocol.credentials import Credentials

        folder = (path if path.is_dir() else path.parent) / "broker"
        return folder if (folder / Credentials.FILE).exists() else None


def _joined_secret(plant: Path | None) -> str | None:
    """The token secret of the plant joined: ``TWINBID_HTTP_SECRET``, else the one its run saved.
    Without it the plant's registry and AAS servers refuse our agents' writes (401)."""
    from protocol.credentials import run_http_secret
    from protocol.tokens import SECRET_ENV

    return os.environ.get(SECRET_ENV) or (run_http_secret(plant) if plant is not None else None)


class VendorPlant:
    """A plant of a scenario's resources with the order-taking service in front (one process).

    ``base_url = await VendorPlant(scenario, vendors, out).start(port=...)`` ... ``await plant.stop()``.
    Vendor orders become product twins (:func:`start_product`) with the plan of their product type; the
    vendor's submodels join the twin's AAS and its shell keeps the vendor's globalAssetId.
    """

    def __init__(
        self,
        scenario: Any,
        vendors: Any,
        out: Path,
        *,
        broker: str | None = None,
        db_url: str | None = None,
        seed: int | None = None,
        config: Any = None,
        outbox: Any = None,
        registry_url: str | None = None,
        resources: bool = True,
        clock: PlantClock | None = None,
        accounts: Path | None = None,
        http_secret: str | None = None,
        signing_secret: str | None = None,
    ) -> None:
        self.scenario = scenario
        # the joined run's signing secret (protocol/signing.py): our products check its resources'
        # signatures and seal their records with the run's keys
        self.signing_secret = signing_secret
        self.http_secret = http_secret  # the joined run's AAS/registry token secret (protocol/tokens.py)
        # The joined run's broker accounts (OUT/broker, saved by `twinbid run`): our product twins
        # get theirs from it, issued on demand like the run's own vendor orders.
        self.accounts = accounts
        # Joining another process's plant: its clock's kind and time base, or simulated times would not agree.
        self.plant_clock = clock
        self.registry_url = registry_url  # an existing plant's registry: serve orders into that plant
        self.with_resources = resources
        self.vendors = vendors
        self.out = Path(out)
        self.broker_url = broker if broker is not None else scenario.broker
        self.db_url = db_url
        self.seed = scenario.seed if seed is None else seed
        self.service_config = config
        self.outbox = outbox
        self.node: Any = None
        self.service: Any = None
        self.clock: Any = None
        self._broker: Any = None
        self._registry: Any = None
        self._requester_config: Any = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        from agents.persistence import open_database
        from agents.persistence.database import sqlite_url
        from agents.resource.agent import start_resource
        from agents.runtime.node import Node, NodeConfig
        from protocol.broker import start_broker
        from protocol.signing import SECRET_ENV as SIGNING_SECRET_ENV
        from protocol.signing import run_signing_secret
        from protocol.tokens import RunTokens, new_secret
        from registry.service import RegistryServer
        from scenarios import assembly
        from scenarios.intake import OrderIntake
        from shopfloor.clock import make_clock

        sc = self.scenario
        self.out.mkdir(parents=True, exist_ok=True)
        signing_secret = self.signing_secret
        if self.registry_url and signing_secret is None and not self.with_resources:
            raise RuntimeError(
                "joining a plant needs its signing secret (its resources sign the step records our "
                f"products accept): give --plant OUT, or set {SIGNING_SECRET_ENV}"
            )
        if signing_secret is None:  # our own plant: its keys kept in our folder
            signing_secret = run_signing_secret(self.out)
        # A broker started here ends with this process, however it ends (protocol.lifeline).
        self._broker = await asyncio.to_thread(start_broker, self.broker_url, self.out, die_with_parent=True)
        passwords: dict[str, str] = {}
        # the joined run's token secret (given, or with its accounts); else this plant's own
        http_secret = self.http_secret or new_secret()
        if self.accounts is not None:
            from protocol.credentials import Credentials

            joined = Credentials.load(self.accounts)
            passwords, http_secret = joined.passwords, joined.http_secret
        if self.registry_url:
            registry_url = self.registry_url
        else:
            tokens = RunTokens(http_secret, sc.namespace)
            self._registry = RegistryServer(sqlite_url(self.out / "registry.db"), tokens=tokens)
            registry_url = await self._registry.start()
        db = open_database(self.db_url or sqlite_url(self.out / "run.db"))
        pc = self.plant_clock or PlantClock(sc.clock.kind, sc.clock.time_scale)
        self.clock = make_clock(pc.kind, time_scale=pc.time_scale or 1.0, wall_origin_ms=pc.wall_origin_ms)
        self.node = Node(
            NodeConfig(
                sc.namespace,
                self._broker.address,
                registry_url,
                passwords=passwords,
                http_secret=http_secret,
                signing_secret=signing_secret,
            ),
            self.clock,
            db,
        )
        await self.node.start()
        await self.clock.start()
        self._requester_config = assembly.requester_config(sc, pc.kind, pc.time_scale)
        validity = assembly.offer_validity(sc, self._requester_config)
        dist = assembly.distances(sc)
        log_dir = self.out / "assets"
        log_dir.mkdir(parents=True, exist_ok=True)
        for r in sc.resources if self.with_resources else ():
            await start_resource(
                self.node,
                assembly.make_asset(sc, r, log_dir, self.seed),
                kind=r.kind,
                distances=dist,
                cost_rates=assembly.cost_rates(r),
                validity=validity,
                breakdown_policy=getattr(r, "breakdown_policy", "finish_late"),
            )
        self.intake = OrderIntake(
            sc,
            self.node,
            self._requester_config,
            vendors=self.vendors,
            registry_url=registry_url,
            service_config=self.service_config,
            outbox=self.outbox,
        )
        self.service = self.intake.service
        return await self.service.start(host, port)

    async def take_order(self, accepted: Any) -> None:
        """``on_order``: start (or, after a restart, resume) the product twin of an accepted order."""
        await self.intake.take_order(accepted)

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self.node is not None:
            with contextlib.suppress(Exception):
                await self.node.journal.commit()
            await self.node.stop()
        if self.clock is not None:
            await self.clock.stop()
        if self._registry is not None:
            await self._registry.stop()
        if self._broker is not None:
            await asyncio.to_thread(self._broker.stop)


@app.command()
def serve(
    scenario: Annotated[Path, typer.Argument(help="scenario file (YAML): resources and product types")],
    vendors: Annotated[
        Path | None, typer.Option(help="vendors file (YAML/JSON); default: the scenario's vendors")
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8090,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: runs/<scenario name>-orders)")
    ] = None,
    plant: Annotated[
        Path | None,
        typer.Option(
            help="join a running plant: its output folder or plant.json (broker, registry, clock; "
            "--broker/--registry override)"
        ),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="broker URL, or 'mosquitto' for a private one")] = None,
    db: Annotated[
        str | None, typer.Option(help="database URL (default: SQLite in the output folder)")
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="registry URL of a running plant (default: start one here)")
    ] = None,
    resources: Annotated[
        bool | None,
        typer.Option(
            help="start the scenario's resources here (default: yes for a plant of its own, "
            "no when joining a running plant, whose resources do the work)"
        ),
    ] = None,
    clock_origin: Annotated[
        int | None,
        typer.Option(
            help="joining a running plant: the wall epoch ms of its simulated time 0 (clock.wall_origin_ms "
            "in its plant.json; --plant reads it)"
        ),
    ] = None,
) -> None:
    """Take vendors' orders over HTTP until interrupted: with the scenario's resources (a plant of its
    own), or into a running plant: `--plant OUT` (the folder of its `twinbid run`), or `--broker URL
    --registry URL --no-resources [--clock-origin MS]`."""
    import logging

    from agents.ordertaking.auth import VendorDirectory, VendorFileError
    from scenarios.loader import ScenarioError, load_scenario

    try:
        sc = load_scenario(scenario)
    except ScenarioError as exc:
        _err(f"invalid scenario\n{exc}")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        directory = (
            VendorDirectory.from_file(vendors) if vendors else VendorDirectory.from_configs(sc.vendors)
        )
    except VendorFileError as exc:
        _err(f"vendors: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if not len(directory):
        _err("no vendors: give --vendors FILE or list vendors in the scenario")
        raise typer.Exit(EXIT_USAGE)
    try:
        clock = _plant_clock(sc, plant, broker, registry, clock_origin)
    except ValueError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    if plant is not None:
        info = PlantInfo.read(plant)
        broker = broker or info.broker
        registry = registry or info.registry
    joining = registry is not None
    if resources is None:
        resources = not joining
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from protocol.signing import SECRET_ENV as SIGNING_SECRET_ENV
    from protocol.signing import joined_signing_secret

    if joining and not resources and joined_signing_secret(plant) is None:
        _err(
            "joining a plant needs its signing secret (its resources sign the step records our products "
            f"accept): give --plant OUT, or set {SIGNING_SECRET_ENV} to the content of OUT/signing.secret"
        )
        raise typer.Exit(EXIT_USAGE)
    vendor_plant = VendorPlant(
        sc,
        directory,
        out or Path("runs") / f"{sc.name}-orders",
        broker=broker,
        db_url=db,
        registry_url=registry,
        resources=resources,
        clock=clock,
        accounts=PlantInfo.accounts(plant) if plant is not None else None,
        http_secret=_joined_secret(plant),
        signing_secret=joined_signing_secret(plant),
    )

    async def main() -> None:
        try:
            url = await vendor_plant.start(host, port)
            into = f"; plant at {registry}" if joining else ""
            sys.stdout.write(
                f"order-taking service at {url}/orders (vendors: {', '.join(directory.names())}{into}); Ctrl-C stops\n"
            )
            sys.stdout.flush()
            await asyncio.Event().wait()
        finally:
            await vendor_plant.stop()

    # SIGTERM (kill, a service manager) stops it as Ctrl-C does: the plant and its broker stop.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        run_stoppable(main())


def _plant_clock(
    sc: Any, plant: Path | None, broker: str | None, registry: str | None, clock_origin: int | None
) -> PlantClock | None:
    """The clock to run on when joining a running plant (None: a plant of our own, the scenario's clock).

    Product twins here and resources there compare simulated times and ``replyBy`` instants, so both must
    count from the same origin at the same rate; a virtual clock cannot span processes at all.
    """
    info = PlantInfo.read(plant) if plant is not None else None
    if info is None and registry is None:
        if clock_origin is not None:
            raise ValueError("--clock-origin is for joining a running plant (--registry or --plant)")
        return None
    if info is not None and info.namespace and info.namespace != sc.namespace:
        raise ValueError(
            f"the plant runs namespace {info.namespace!r} but the scenario says {sc.namespace!r}: "
            "serve with the plant's scenario"
        )
    if info is not None and not (info.registry or registry):
        raise ValueError(f"{plant}: no registry URL in it; give --registry")
    clock = info.clock if info is not None and info.clock else PlantClock(sc.clock.kind, sc.clock.time_scale)
    if clock_origin is not None:
        clock = dataclasses.replace(clock, wall_origin_ms=clock_origin)
    if clock.kind == "virtual":
        raise ValueError(
            "the plant runs a virtual clock, which cannot span processes: run the plant with a real or "
            "accelerated clock (and `stop: {when: max_time, ...}` to keep it serving)"
        )
    if clock.wall_origin_ms is None and clock.kind == "real":
        _err(
            "warning: the plant's clock origin is unknown (--plant OUT or --clock-origin MS): deadlines agree, "
            "but simulated times here are counted from this service's start, not the plant's"
        )
    elif clock.wall_origin_ms is None:
        raise ValueError(
            "joining a running plant needs its time base: give --plant OUT (its output folder), or "
            "--clock-origin MS (clock.wall_origin_ms in its plant.json)"
        )
    return clock
