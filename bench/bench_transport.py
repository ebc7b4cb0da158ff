"""Transport benchmark: QoS 1 throughput and one-way latency through loopback brokers.

    python bench/bench_transport.py [--messages N] [--repeat R] [--broker both|mosquitto|embedded] [--json]

For a private mosquitto (generated config, ``set_tcp_nodelay true``) and for the embedded amqtt
broker (child process), in one Python process:

* throughput: one ``MqttTransport`` publishes N QoS 1 messages as fast as its in-flight window
  allows, another receives them (PUBACK after the handler); messages/s from the first publish to
  the last delivery, and the process's CPU time per message;
* latency: messages carrying ``perf_counter_ns`` at a moderate, paced rate; one-way latency
  (publish call to handler call) p50/p99 (same process, same clock).

Each figure is the median of ``--repeat`` runs.  Prints a table, the machine, and a JSON object
of the figures as the last line (only the JSON with ``--json``).  Uses loopback only and ends by
itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machineinfo import machine

from protocol.broker import EmbeddedBroker
from protocol.mosquitto import MosquittoProcess, find_mosquitto
from protocol.transport import BrokerAddress, MqttTransport

RUN_TIMEOUT = 120.0  # seconds, per measurement


@dataclass
class Figures:
    throughput: float  # messages/s
    cpu_us_per_msg: float
    p50_ms: float
    p99_ms: float
    window: int
    mqtt: str


async def _ignore(topic: str, payload: bytes) -> None:
    return None


MAX_INFLIGHT = 16  # MqttTransport's default; --max-inflight changes it


async def measure_throughput(address: BrokerAddress, n: int, tag: str) -> tuple[float, float, int, str]:
    received = 0
    done = asyncio.Event()

    async def count(topic: str, payload: bytes) -> None:
        nonlocal received
        received += 1
        if received >= n:
            done.set()

    sub = MqttTransport(f"bench-sub-{tag}", address, count, clean_start=True)
    pub = MqttTransport(f"bench-pub-{tag}", address, _ignore, clean_start=True, max_inflight=MAX_INFLIGHT)
    await sub.connect()
    await pub.connect()
    try:
        await sub.subscribe(f"bench/{tag}/#")
        payload = b"x" * 200  # a small frame's worth
        topic = f"bench/{tag}/to/sub/pub"
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await pub.publish(topic, payload)
        await asyncio.wait_for(done.wait(), RUN_TIMEOUT)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return n / elapsed, cpu / n * 1e6, pub.window, pub.mqtt_version or "?"
    finally:
        await pub.close(timeout=5)
        await sub.close(timeout=5)


async def measure_latency(address: BrokerAddress, n: int, rate: float, tag: str) -> tuple[float, float]:
    latencies: list[int] = []
    done = asyncio.Event()

    async def stamp(topic: str, payload: bytes) -> None:
        latencies.append(time.perf_counter_ns() - int(payload[:20]))
        if len(latencies) >= n:
            done.set()

    sub = MqttTransport(f"bench-lsub-{tag}", address, stamp, clean_start=True)
    pub = MqttTransport(f"bench-lpub-{tag}", address, _ignore, clean_start=True)
    await sub.connect()
    await pub.connect()
    try:
        await sub.subscribe(f"lat/{tag}/#")
        topic = f"lat/{tag}/to/sub/pub"
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(n):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.publish(topic, b"%020d" % time.perf_counter_ns() + b"y" * 180)
        await asyncio.wait_for(done.wait(), RUN_TIMEOUT)
    finally:
        await pub.close(timeout=5)
        await sub.close(timeout=5)
    warm = sorted(latencies[n // 10 :])  # drop the first 10 % (connection warm-up)
    return warm[len(warm) // 2] / 1e6, warm[min(len(warm) - 1, int(len(warm) * 0.99))] / 1e6


async def measure_raw_gmqtt_latency(address: BrokerAddress, n: int, rate: float) -> tuple[float, float]:
    """Reference: bare gmqtt (sync callback, PUBACK before the callback, no ordering guarantees)."""
    import gmqtt

    latencies: list[int] = []
    done = asyncio.Event()

    def stamp(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> None:
        latencies.append(time.perf_counter_ns() - int(payload[:20]))
        if len(latencies) >= n:
            done.set()

    sub, pub = gmqtt.Client("bench-raw-sub"), gmqtt.Client("bench-raw-pub")
    sub.on_message = stamp
    await sub.connect(address.host, address.port)
    await pub.connect(address.host, address.port)
    subscribed = asyncio.Event()
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.subscribe("raw/#", qos=1)
    await asyncio.wait_for(subscribed.wait(), 10)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pub.publish("raw/x", b"%020d" % time.perf_counter_ns() + b"y" * 180, qos=1)
    await asyncio.wait_for(done.wait(), RUN_TIMEOUT)
    await pub.disconnect()
    await sub.disconnect()
    warm = sorted(latencies[n // 10 :])
    return warm[len(warm) // 2] / 1e6, warm[min(len(warm) - 1, int(len(warm) * 0.99))] / 1e6


async def run_broker(
    name: str, address: BrokerAddress, n: int, n_lat: int, rate: float, repeat: int
) -> Figures:
    runs: list[tuple[float, float, int, str]] = []
    lats: list[tuple[float, float]] = []
    for r in range(repeat):
        runs.append(await measure_throughput(address, n, f"{name}{r}"))
        lats.append(await measure_latency(address, n_lat, rate, f"{name}{r}"))
    return Figures(
        throughput=statistics.median(x[0] for x in runs),
        cpu_us_per_msg=statistics.median(x[1] for x in runs),
        p50_ms=statistics.median(x[0] for x in lats),
        p99_ms=statistics.median(x[1] for x in lats),
        window=runs[0][2],
        mqtt=runs[0][3],
    )


def versions() -> dict[str, Any]:
    """What this benchmark measures besides the machine: the broker and client versions."""
    info: dict[str, Any] = {}
    binary = find_mosquitto()
    if binary:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
        info["mosquitto"] = out.splitlines()[0].replace("mosquitto version ", "") if out else "?"
    try:
        from importlib.metadata import version

        info["gmqtt"] = version("gmqtt")
        info["amqtt"] = version("amqtt")
    except Exception:
        pass
    return info


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine(**versions()),
        "messages": args.messages,
        "repeat": args.repeat,
        "max_inflight": args.max_inflight,
        "latency_rate": args.rate,
    }
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        if args.broker in ("both", "mosquitto") and find_mosquitto():
            with MosquittoProcess(Path(tmp) / "mosquitto", persistence=False) as mosq:
                figures = await run_broker(
                    "mosquitto", mosq.address, args.messages, args.latency_messages, args.rate, args.repeat
                )
                results["mosquitto"] = figures.__dict__
                raw = [
                    await measure_raw_gmqtt_latency(mosq.address, args.latency_messages, args.rate)
                    for _ in range(args.repeat)
                ]
                results["raw_gmqtt_reference"] = {
                    "p50_ms": statistics.median(x[0] for x in raw),
                    "p99_ms": statistics.median(x[1] for x in raw),
                }
        if args.broker in ("both", "embedded"):
            with EmbeddedBroker(Path(tmp) / "amqtt") as amqtt:
                n = min(args.messages, args.embedded_messages)
                figures = await run_broker(
                    "amqtt", amqtt.address, n, min(args.latency_messages, 1000), args.rate, args.repeat
                )
                results["embedded_amqtt"] = figures.__dict__ | {"messages": n}
    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['os']}")
    print(
        f"         mosquitto {m.get('mosquitto', '-')}, gmqtt {m.get('gmqtt', '?')}, amqtt {m.get('amqtt', '?')}, "
        f"load average {m.get('loadavg_before')} -> {m.get('loadavg_after')}"
    )
    print(
        f"median of {results['repeat']} runs; QoS 1, 200-byte payloads, one process publishing and subscribing\n"
    )
    header = f"{'broker':<16}{'MQTT':>6}{'window':>8}{'msgs':>8}{'msg/s':>10}{'CPU µs/msg':>12}{'p50 ms':>9}{'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for key, label in (("mosquitto", "mosquitto"), ("embedded_amqtt", "amqtt (child)")):
        f = results.get(key)
        if f is None:
            continue
        msgs = f.get("messages", results["messages"])
        print(
            f"{label:<16}{f['mqtt']:>6}{f['window']:>8}{msgs:>8}{f['throughput']:>10.0f}"
            f"{f['cpu_us_per_msg']:>12.1f}{f['p50_ms']:>9.3f}{f['p99_ms']:>9.3f}"
        )
        raw = results.get("raw_gmqtt_reference")
        if key == "mosquitto" and raw:
            print(
                f"{'  bare gmqtt':<16}{'5':>6}{'-':>8}{'-':>8}{'-':>10}{'-':>12}"
                f"{raw['p50_ms']:>9.3f}{raw['p99_ms']:>9.3f}   (reference: PUBACK before callback, no order)"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per throughput run")
    parser.add_argument(
        "--embedded-messages", type=int, default=3_000, help="cap for the (slow) amqtt broker"
    )
    parser.add_argument("--latency-messages", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="messages/s during the latency runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker", choices=("both", "mosquitto", "embedded"), default="both")
    parser.add_argument("--max-inflight", type=int, default=16, help="publisher's max_inflight")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    global MAX_INFLIGHT
    MAX_INFLIGHT = args.max_inflight
    results = asyncio.run(asyncio.wait_for(main_async(args), 30 * 60))
    if not args.json:
        print_table(results)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
