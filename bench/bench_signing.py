"""CPU cost of signed, hash-chained step records: per step on the plant, and per step checked offline.

What each completed step adds to a run (protocol/signing.py, agents/aas/record_chain.py): the
executing resource signs its completion (Ed25519), the product checks that signature against the
resource's key and seals the record into its chain (SHA-256 of the previous link, Ed25519); and
what `twinbid verify` spends per step. Measured in this process, on records shaped as a run
writes them, the best of ``--repeat`` rounds of ``--steps`` steps each (the minimum is the least
disturbed by other load on the machine). A whole plant's CPU per step, with and without the
signatures, is what ``bench_negotiation.py --against`` compares (docs/security.md).

    python bench/bench_signing.py [--steps 2000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.aas import record_chain
from agents.aas.docjson import completion, prop
from protocol import signing

SECRET = "a benchmark secret, any 16+ characters"
PRODUCT, RESOURCE, STEPS_PER_PRODUCT = "gear-1", "mill-1", 10


def _product(steps: int) -> tuple[dict[int, dict], dict[str, float]]:
    """Document ``steps`` steps as a plant does; CPU seconds by who spends them."""
    key = signing.public_key_text(SECRET, RESOURCE)
    spent = {"resource_sign": 0.0, "product_check": 0.0, "product_seal": 0.0}
    records: dict[int, dict] = {}
    for i in range(1, steps + 1):
        body = completion(i, 3.0 + i, 5.5 + i, RESOURCE)
        t0 = time.process_time()
        signed = record_chain.sign_completion(SECRET, PRODUCT, i, body)
        t1 = time.process_time()
        assert record_chain.signature_problem(PRODUCT, i, signed, key) is None
        t2 = time.process_time()
        previous = record_chain.previous_hash(PRODUCT, records, i)
        sealed = record_chain.seal_record(SECRET, PRODUCT, i, signed, previous)
        t3 = time.process_time()
        sealed["value"].append(prop("StepIndex", str(i), "xs:int"))
        records[i] = sealed
        spent["resource_sign"] += t1 - t0
        spent["product_check"] += t2 - t1
        spent["product_seal"] += t3 - t2
    return records, spent


def measure(steps: int, repeat: int) -> dict:
    best: dict[str, float] = {}
    for _ in range(repeat):
        spent = {"resource_sign": 0.0, "product_check": 0.0, "product_seal": 0.0, "offline_check": 0.0}
        for _ in range(max(1, steps // STEPS_PER_PRODUCT)):
            records, plant = _product(STEPS_PER_PRODUCT)
            for name, seconds in plant.items():
                spent[name] += seconds
            t0 = time.process_time()
            assert record_chain.check_records(records) is None
            spent["offline_check"] += time.process_time() - t0
        done = max(1, steps // STEPS_PER_PRODUCT) * STEPS_PER_PRODUCT
        for name, seconds in spent.items():
            best[name] = min(best.get(name, float("inf")), seconds / done * 1e6)
    best["plant_total"] = best["resource_sign"] + best["product_check"] + best["product_seal"]
    return {"steps": steps, "repeat": repeat, "us_per_step": {k: round(v, 1) for k, v in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="end with one JSON object of every figure")
    args = parser.parse_args()
    result = measure(args.steps, args.repeat)
    for name, value in result["us_per_step"].items():
        print(f"{name:<15} {value:8.1f} us CPU per step")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
