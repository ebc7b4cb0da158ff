"""`twinbid vendor ...`: submit a product AAS as a vendor, serve the order-taking service, manage API keys.

* ``submit FILE --url URL --key KEY`` — what a vendor runs: uploads an AAS (``.aasx`` or ``.json``), prints the
  order id and status; exit code 1 with the server's messages when the order is refused.
* ``serve SCENARIO --vendors FILE`` — a plant (the scenario's resources) with the order-taking service in front.
* ``new-key VENDOR``, ``hash-key``, ``webhook-secret`` — API keys and their hashes for the vendors file.

:class:`VendorPlant` (used by ``serve`` and the tests) is the composition: broker, registry, one node with the
scenario's resources, and the service whose ``on_order`` starts a product twin with :func:`start_product`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

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
    ) -> None:
        self.scenario = scenario
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
        from registry.service import RegistryServer
        from scenarios import assembly
        from scenarios.intake import OrderIntake
        from shopfloor.clock import make_clock

        sc = self.scenario
        self.out.mkdir(parents=True, exist_ok=True)
        self._broker = await asyncio.to_thread(start_broker, self.broker_url, self.out)
        if self.registry_url:
            registry_url = self.registry_url
        else:
            self._registry = RegistryServer(sqlite_url(self.out / "registry.db"))
            registry_url = await self._registry.start()
        db = open_database(self.db_url or sqlite_url(self.out / "run.db"))
        self.clock = make_clock(sc.clock.kind, time_scale=sc.clock.time_scale or 1.0)
        self.node = Node(NodeConfig(sc.namespace, self._broker.address, registry_url), self.clock, db)
        await self.node.start()
        await self.clock.start()
        self._requester_config = assembly.requester_config(sc, sc.clock.kind, sc.clock.time_scale)
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
    broker: Annotated[str | None, typer.Option(help="broker URL, or 'mosquitto' for a private one")] = None,
    db: Annotated[
        str | None, typer.Option(help="database URL (default: SQLite in the output folder)")
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="registry URL of a running plant (default: start one here)")
    ] = None,
    resources: Annotated[
        bool, typer.Option(help="start the scenario's resources here (--no-resources: they run in the plant)")
    ] = True,
) -> None:
    """Take vendors' orders over HTTP until interrupted: with the scenario's resources (a plant of its
    own), or `--broker URL --registry URL --no-resources` to serve orders into a running plant."""
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plant = VendorPlant(
        sc,
        directory,
        out or Path("runs") / f"{sc.name}-orders",
        broker=broker,
        db_url=db,
        registry_url=registry,
        resources=resources,
    )

    async def main() -> None:
        try:
            url = await plant.start(host, port)
            sys.stdout.write(
                f"order-taking service at {url}/orders (vendors: {', '.join(directory.names())}); Ctrl-C stops\n"
            )
            sys.stdout.flush()
            await asyncio.Event().wait()
        finally:
            await plant.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
