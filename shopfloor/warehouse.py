"""A simulated warehouse: capacity, inventory of materials and finished goods, store and retrieve.

Config::

    location: store-1
    capacity: 50                     # items; omit for unlimited
    inventory: {blank-steel: 10}     # initial inventory (only used when the log is new)
    store: {capability: store, duration: 4}          # null: not offered
    retrieve: {capability: retrieve, duration: {uniform: [3, 5]}}
    cost_rate: 0.5

Jobs name their item in ``params["item"]`` (default: the job's product, i.e. a finished good) and
may give ``params["quantity"]`` (default 1).

Inventory is physical state, so it lives in the execution log: the first ``init`` entry holds the
initial inventory, a retrieve takes its items out when it *starts*, a store puts them in when it
*finishes* (its slots are occupied from its start). After a restart the inventory is replayed from
the log, never re-read from the config.

Reservations are booking state, not physical state: :meth:`Warehouse.reserve` holds free slots
(store) or items (retrieve) from booking until the job starts, so two accepted store jobs cannot
overfill the warehouse. They live in memory; a restarted resource agent re-reserves its accepted
work orders (``reserve`` is idempotent per ``job_id``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .asset import Estimate, Job
from .durations import DurationModel, parse_duration, step_duration
from .simulated import SimulatedAsset

__all__ = ["Warehouse"]


class Warehouse(SimulatedAsset):
    def __init__(
        self,
        name: str,
        *,
        capacity: int | None = None,
        inventory: Mapping[str, int] | None = None,
        location: str = "",
        store_capability: str | None = "store",
        retrieve_capability: str | None = "retrieve",
        store_duration: Any = 1.0,
        retrieve_duration: Any = 1.0,
        cost_rate: float = 0.0,
        seed: object = 0,
        log_path: str | os.PathLike[str] | None = None,
        parallel: int = 1,
    ) -> None:
        if capacity is not None and int(capacity) < 0:
            raise ValueError("capacity must be >= 0")
        if store_capability is None and retrieve_capability is None:
            raise ValueError(f"warehouse {name!r} needs 'store' or 'retrieve' (or both)")
        if store_capability == retrieve_capability:
            raise ValueError("store and retrieve capabilities must differ")
        self.capacity = None if capacity is None else int(capacity)
        self.store_capability = store_capability
        self.retrieve_capability = retrieve_capability
        # Only what it offers: a warehouse declared for retrieve alone must not bid for stores.
        self.durations: dict[str, DurationModel] = {
            cap: parse_duration(duration)
            for cap, duration in (
                (store_capability, store_duration),
                (retrieve_capability, retrieve_duration),
            )
            if cap is not None
        }
        self.inventory: dict[str, int] = {}
        self._initialized = False
        self._storing: dict[str, tuple[str, int]] = {}  # job_id -> (item, qty): started, not finished
        self._reserved: dict[str, tuple[str, str, int]] = {}  # job_id -> (capability, item, qty)
        super().__init__(
            name,
            location=location,
            cost_rate=cost_rate,
            seed=seed,
            log_path=log_path,
            parallel=parallel,
        )
        initial = {str(k): int(v) for k, v in (inventory or {}).items() if int(v) != 0}
        if any(v < 0 for v in initial.values()):
            raise ValueError("inventory counts must be >= 0")
        if not self._initialized:
            if self.capacity is not None and sum(initial.values()) > self.capacity:
                raise ValueError(
                    f"initial inventory ({sum(initial.values())}) exceeds capacity {self.capacity}"
                )
            self._write({"event": "init", "inventory": initial})

    @classmethod
    def from_config(
        cls,
        name: str,
        config: Mapping[str, Any],
        *,
        seed: object = 0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> Warehouse:
        known = {"location", "capacity", "inventory", "store", "retrieve", "cost_rate", "seed", "parallel"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"warehouse {name!r}: unknown config keys {sorted(unknown)}")

        def op(key: str) -> tuple[str | None, Any]:
            spec = config.get(key, {})
            if spec is None:
                return None, None  # declared as not offered
            if not isinstance(spec, Mapping):
                return key, spec  # just a duration
            return str(spec.get("capability", key)), spec.get("duration", 1.0)

        store_cap, store_dur = op("store")
        retrieve_cap, retrieve_dur = op("retrieve")
        return cls(
            name,
            capacity=config.get("capacity"),
            inventory=config.get("inventory"),
            location=str(config.get("location", "")),
            store_capability=store_cap,
            retrieve_capability=retrieve_cap,
            store_duration=store_dur,
            retrieve_duration=retrieve_dur,
            cost_rate=float(config.get("cost_rate", 0.0)),
            seed=config.get("seed", seed),
            log_path=log_path,
            parallel=int(config.get("parallel", 1)),
        )

    # -- state -----------------------------------------------------------------------------
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.durations)

    @staticmethod
    def item_of(job: Job) -> tuple[str, int]:
        item = job.params.get("item") or job.product
        qty = int(job.params.get("quantity", 1))
        if qty < 1:
            raise ValueError(f"job {job.job_id}: quantity must be >= 1")
        return str(item), qty

    @property
    def occupied(self) -> int:
        """Slots taken by stored items and by stores in progress."""
        return sum(self.inventory.values()) + sum(q for _, q in self._storing.values())

    def free_slots(self, *, exclude_job: str | None = None) -> float:
        """Free slots after reservations (other than ``exclude_job``'s); inf when unlimited."""
        if self.capacity is None:
            return float("inf")
        reserved = sum(
            q
            for jid, (cap, _, q) in self._reserved.items()
            if cap == self.store_capability and jid != exclude_job
        )
        return self.capacity - self.occupied - reserved

    def available(self, item: str, *, exclude_job: str | None = None) -> int:
        """Items on hand not reserved by a retrieve other than ``exclude_job``."""
        reserved = sum(
            q
            for jid, (cap, it, q) in self._reserved.items()
            if cap == self.retrieve_capability and it == item and jid != exclude_job
        )
        return self.inventory.get(item, 0) - reserved

    def reservations(self) -> dict[str, tuple[str, str, int]]:
        return dict(self._reserved)

    # -- SimulatedAsset hooks --------------------------------------------------------------
    def _problem(self, job: Job) -> str | None:
        item, qty = self.item_of(job)
        if job.capability == self.store_capability and self.free_slots(exclude_job=job.job_id) < qty:
            return f"warehouse {self.name} full (capacity {self.capacity})"
        if job.capability == self.retrieve_capability and self.available(item, exclude_job=job.job_id) < qty:
            return f"item {item!r} missing in {self.name} (need {qty}, have {self.inventory.get(item, 0)})"
        return None

    def _plan(self, job: Job, previous_capability: str | None) -> Estimate | None:
        model = self.durations.get(job.capability)
        if model is None:
            return None
        duration = step_duration(job.params, job.capability)
        if duration is None:
            duration = model.sample_for(self.seed, self.name, job.job_id, job.capability)
        return Estimate(setup=0.0, duration=duration)

    def _on_entry(self, entry: dict[str, Any]) -> None:
        event = entry.get("event")
        if event == "init":
            if not self._initialized:
                self.inventory = {str(k): int(v) for k, v in entry.get("inventory", {}).items()}
                self._initialized = True
            return
        if event not in ("started", "finished"):
            return
        job = Job.from_dict(entry)
        self._reserved.pop(job.job_id, None)
        item, qty = self.item_of(job)
        if event == "started":
            if job.capability == self.retrieve_capability:
                left = self.inventory.get(item, 0) - qty
                if left > 0:
                    self.inventory[item] = left
                else:
                    self.inventory.pop(item, None)
            elif job.capability == self.store_capability:
                self._storing[job.job_id] = (item, qty)
        elif job.job_id in self._storing:
            self._storing.pop(job.job_id)
            if entry.get("outcome") == "done":
                self.inventory[item] = self.inventory.get(item, 0) + qty

    # -- reservations ----------------------------------------------------------------------
    def reserve(self, job: Job) -> bool:
        """Hold slots (store) or items (retrieve) for ``job`` until it starts. Idempotent."""
        if job.job_id in self._reserved:
            return True
        if job.capability not in self.durations:
            return False
        status = self.job_status(job.job_id)
        if status.state == "started" or (
            status.state == "finished" and status.record is not None and status.record.ok
        ):
            return True  # nothing left to hold
        if self._problem(job) is not None:
            return False
        item, qty = self.item_of(job)
        self._reserved[job.job_id] = (job.capability, item, qty)
        return True

    def release(self, job: Job) -> None:
        self._reserved.pop(job.job_id, None)

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        data.update(
            capacity=self.capacity,
            inventory=dict(sorted(self.inventory.items())),
            occupied=self.occupied,
            durations={cap: m.to_config() for cap, m in sorted(self.durations.items())},
        )
        return data
