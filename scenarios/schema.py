"""The scenario format: what a `twinbid run scenarios/<name>.yaml` file may say.

A scenario describes one plant run: where the broker and the database are, how time passes,
how the bidding procedure is tuned, which resources (workstations, warehouses) stand where,
which product types exist with their process plans, which orders release which product
instances, which faults to inject and when to stop.

Why pydantic models with ``extra="forbid"`` and ``strict=True``: a scenario is typed by hand,
and a typo (``capabilites:``) or a quoted number must be an error naming the field, not a
silently ignored key or a surprising coercion. Cross-field rules (names unique, every plan step
doable by some resource, orders of known product types, ...) live in :meth:`Scenario._cross_check`
and report *every* problem with its own field path, so a user fixes a file in one pass.

This module imports only the stdlib and pydantic; the YAML side is in :mod:`scenarios.loader`.
"""

from __future__ import annotations

import importlib
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

__all__ = [
    "CAPABILITY_SEMANTIC_ID_BASE",
    "MAX_PRODUCT_INSTANCES",
    "UNION_TAGS",
    "Alternative",
    "Benchmark",
    "Bidding",
    "Breakdown",
    "BrokerFault",
    "BrokerTLS",
    "Clock",
    "CrossFieldErrors",
    "Duration",
    "KillFault",
    "Order",
    "PlanStep",
    "ProductInstance",
    "ProductType",
    "Scenario",
    "Security",
    "Stop",
    "Transport",
    "TransportLeg",
    "Vendor",
    "Warehouse",
    "WarehouseCapabilities",
    "WarehouseOperation",
    "Workstation",
    "WorkstationCapability",
    "is_short_name",
    "short_name_from",
]

SHORT_NAME_RE = re.compile(r"[a-z0-9-]+")
CAPABILITY_SEMANTIC_ID_BASE = "https://twinbid.dev/capabilities/"
#: Upper bound on the product instances a scenario may expand to. It protects against a typo
#: (``quantity: 1000000000``) eating the machine's memory; no sensible run comes close.
MAX_PRODUCT_INSTANCES = 100_000
#: Capability names a warehouse offers (fixed, so plans can name them without knowing the plant).
WAREHOUSE_CAPABILITIES = ("store", "retrieve")
MQTT_URL_SCHEMES = ("mqtt", "mqtts", "tcp", "ssl", "ws", "wss")


# --------------------------------------------------------------------------- small types


def is_short_name(value: str) -> bool:
    """True for an agent/capability short name: ``[a-z0-9-]+``."""
    return bool(SHORT_NAME_RE.fullmatch(value))


def short_name_from(text: str) -> str:
    """Lowercase ``text`` and turn every run of other characters into one ``-`` (may be empty)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _check_short_name(value: str) -> str:
    if not is_short_name(value):
        raise PydanticCustomError(
            "short_name",
            "must be a short name: lowercase letters, digits and '-' only (got {got})",
            {"got": repr(value)},
        )
    return value


def _check_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "must not be empty")
    return value


def _check_parameter(value: Any) -> Any:
    ok = isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value))
    if not ok:
        raise PydanticCustomError(
            "parameter_value",
            "a parameter value must be text, a number or a boolean (got {got})",
            {"got": _short_repr(value)},
        )
    return value


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


ShortName = Annotated[str, AfterValidator(_check_short_name)]
Text = Annotated[str, AfterValidator(_check_text)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
ParameterValue = Annotated[Any, AfterValidator(_check_parameter)]


class _Model(BaseModel):
    """Base of every scenario model: unknown keys are errors, no type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- durations

_DIST_ARITY = {"uniform": 2, "triangular": 3, "normal": 2}
_DURATION_HELP = (
    "expected a number >= 0 or one of {uniform: [lo, hi]}, {triangular: [lo, mode, hi]}, {normal: [mean, sd]}"
)


@dataclass(frozen=True)
class Duration:
    """A processing time in simulated time units: fixed or drawn from a distribution.

    YAML forms: ``4`` (fixed), ``{uniform: [lo, hi]}``, ``{triangular: [lo, mode, hi]}``,
    ``{normal: [mean, sd]}``. Draws of ``normal`` are truncated at 0 (a negative time makes no
    sense); the others cannot go below 0 because their bounds are validated to be >= 0.
    """

    dist: Literal["fixed", "uniform", "triangular", "normal"]
    params: tuple[float, ...]

    @classmethod
    def fixed(cls, value: float) -> Duration:
        return cls("fixed", (float(value),))

    @property
    def mean(self) -> float:
        """Expected value (used e.g. to estimate completion times in a proposal)."""
        p = self.params
        if self.dist == "fixed":
            return p[0]
        if self.dist == "uniform":
            return (p[0] + p[1]) / 2
        if self.dist == "triangular":
            return (p[0] + p[1] + p[2]) / 3
        return p[0]  # normal (truncation at 0 ignored: mean is validated > 0)

    def sample(self, rng: random.Random) -> float:
        """One draw; pass a seeded ``random.Random`` so runs are repeatable."""
        p = self.params
        if self.dist == "fixed":
            return p[0]
        if self.dist == "uniform":
            return rng.uniform(p[0], p[1])
        if self.dist == "triangular":
            return rng.triangular(p[0], p[2], p[1])  # stdlib order: low, high, mode
        return max(0.0, rng.gauss(p[0], p[1]))

    def to_data(self) -> float | dict[str, list[float]]:
        """The YAML/JSON form this duration was read from."""
        if self.dist == "fixed":
            return self.params[0]
        return {self.dist: list(self.params)}

    @classmethod
    def parse(cls, value: Any) -> Duration:
        """Validate the YAML form; raises ``PydanticCustomError`` with a readable message."""
        if isinstance(value, Duration):
            return value
        if _is_number(value):
            number = _finite(value)
            if number is None or number < 0:
                raise PydanticCustomError(
                    "duration",
                    "a duration must be a finite number >= 0 (got {got})",
                    {"got": _short_repr(value)},
                )
            return cls.fixed(number)
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _DIST_ARITY:
            raise PydanticCustomError(
                "duration", _DURATION_HELP + " (got {got})", {"got": _short_repr(value)}
            )
        dist, raw = next(iter(value.items()))
        arity = _DIST_ARITY[dist]
        shape = {"uniform": "[lo, hi]", "triangular": "[lo, mode, hi]", "normal": "[mean, sd]"}[dist]
        nums = [_finite(x) if _is_number(x) else None for x in raw] if isinstance(raw, list) else None
        if nums is None or len(nums) != arity or any(x is None for x in nums):
            raise PydanticCustomError(
                "duration",
                "{dist} needs a list of {n} finite numbers {shape} (got {got})",
                {"dist": dist, "n": arity, "shape": shape, "got": _short_repr(raw)},
            )
        params = tuple(float(x) for x in nums)  # type: ignore[arg-type]
        if dist == "uniform" and not 0 <= params[0] <= params[1]:
            raise PydanticCustomError(
                "duration", "uniform [lo, hi] needs 0 <= lo <= hi (got {got})", {"got": list(params)}
            )
        if dist == "triangular" and not 0 <= params[0] <= params[1] <= params[2]:
            raise PydanticCustomError(
                "duration",
                "triangular [lo, mode, hi] needs 0 <= lo <= mode <= hi (got {got})",
                {"got": list(params)},
            )
        if dist == "normal" and not (params[0] > 0 and params[1] >= 0):
            raise PydanticCustomError(
                "duration", "normal [mean, sd] needs mean > 0 and sd >= 0 (got {got})", {"got": list(params)}
            )
        return cls(dist, params)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda d: d.to_data()),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        def pair(n: int) -> dict[str, Any]:
            return {"type": "array", "items": {"type": "number"}, "minItems": n, "maxItems": n}

        return {
            "oneOf": [
                {"type": "number", "minimum": 0},
                *(
                    {
                        "type": "object",
                        "properties": {k: pair(n)},
                        "required": [k],
                        "additionalProperties": False,
                    }
                    for k, n in _DIST_ARITY.items()
                ),
            ]
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> float | None:
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------- top-level sections


class Clock(_Model):
    """How simulated time relates to wall time (see ``shopfloor`` Clock)."""

    kind: Literal["real", "accelerated", "virtual"] = "virtual"
    #: Wall milliseconds per simulated time unit; only for ``accelerated`` (and required there).
    time_scale: Positive | None = None

    @model_validator(mode="after")
    def _time_scale_only_when_accelerated(self) -> Clock:
        if self.kind == "accelerated" and self.time_scale is None:
            raise ValueError(
                "time_scale (wall ms per simulated time unit) is required when kind is 'accelerated'"
            )
        if self.kind != "accelerated" and self.time_scale is not None:
            raise ValueError(f"time_scale applies only to kind 'accelerated', not to {self.kind!r}")
        return self


#: The selection policies twinbid ships (``protocol.selection.POLICIES``; a test keeps both equal).
BUILTIN_POLICIES = ("priority-weighted", "earliest-completion", "cheapest")


def _known_policy(spec: str) -> str:
    """A built-in policy, or ``module:Class`` naming a class with a ``rank`` method importable now.

    The product makes the policy (``protocol.selection.make_policy``) when it starts; checking
    the import here turns a typo into a scenario error instead of products that cannot start.
    """
    if spec in BUILTIN_POLICIES:
        return spec
    module_name, colon, class_name = spec.partition(":")
    if not colon:
        raise ValueError(
            f"unknown selection policy {spec!r}; known: {', '.join(BUILTIN_POLICIES)}, or module:Class"
        )
    if not module_name or not class_name:
        raise ValueError(f"selection policy {spec!r}: write module:Class, e.g. mypackage.policies:Fastest")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"selection policy {spec!r}: cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"selection policy {spec!r}: module {module_name!r} has no class {class_name!r}")
    if not callable(getattr(cls, "rank", None)):
        raise ValueError(f"selection policy {spec!r}: {class_name} has no rank(offers, priority) method")
    return spec


PolicySpec = Annotated[str, AfterValidator(_known_policy)]


class Selection(_Model):
    """The selection policy of each priority: a built-in name (``priority-weighted``,
    ``earliest-completion``, ``cheapest``) or ``module:Class`` naming a researcher's class
    (made with no arguments, offering ``rank(offers, priority)``). Each product keeps the policy
    it was started with in its record; a restarted product ranks with that one."""

    #: The policy of every priority not listed in ``by_priority``.
    default: PolicySpec = "priority-weighted"
    #: Priority (1..5) -> policy, e.g. ``{5: cheapest}``.
    by_priority: dict[Annotated[int, Field(ge=1, le=5)], PolicySpec] = {}

    def for_priority(self, priority: int) -> str:
        return self.by_priority.get(priority, self.default)


class Bidding(_Model):
    """Tuning of the VDI/VDE 2193-2 bidding procedure; all times in simulated time units."""

    #: How long a call for proposal collects proposals (replyBy = sent + reply_window).
    reply_window: Positive = 2.0
    #: Rounds in a row without any proposal before the step fails.
    max_rounds: Annotated[int, Field(ge=1)] = 5
    #: Wait before re-issuing a call for proposal that got no proposal ...
    backoff: NonNegative = 5.0
    #: ... multiplied by this factor after each further empty round (1 = constant back-off).
    backoff_factor: Annotated[float, Field(ge=1)] = 2.0
    #: A proposal is binding until replyBy + offer_validity; the provider then drops its hold.
    offer_validity: Positive = 10.0
    #: Wait for informConfirm after acceptProposal before bidding the step again.
    confirm_timeout: Positive = 5.0
    #: Top priority with a choice of resources commits only to an offer that starts now; while
    #: every capable resource is busy it rejects the offers and calls again when the best one
    #: would start (better schedules, more messages). False: take the best offer at once.
    #: Unset: on only where it wins time, a plant whose orders all have one priority (see
    #: `scenarios.assembly.defers`).
    defer_until_start: bool | None = None
    #: How a product chooses among the proposals (see :class:`Selection`); a bare string is
    #: the policy of every priority.
    selection: Selection = Selection()

    @field_validator("selection", mode="before")
    @classmethod
    def _one_policy_for_all(cls, value: Any) -> Any:
        return {"default": value} if isinstance(value, str) else value


class TransportLeg(_Model):
    from_: Text = Field(alias="from")
    to: Text
    time: NonNegative


class Transport(_Model):
    """Transport times between locations (simulated time units)."""

    #: Time between two different locations not listed in ``legs``. Same location: always 0.
    default_time: NonNegative = 0.0
    #: A leg listed in one direction only also applies the other way round.
    symmetric: bool = True
    legs: list[TransportLeg] = []

    def time(self, origin: str | None, destination: str | None) -> float:
        """Transport time from ``origin`` to ``destination``; 0 when either is unknown (None)."""
        if origin is None or destination is None or origin == destination:
            return 0.0
        for leg in self.legs:
            if leg.from_ == origin and leg.to == destination:
                return leg.time
        if self.symmetric:
            for leg in self.legs:
                if leg.from_ == destination and leg.to == origin:
                    return leg.time
        return self.default_time


class Breakdown(_Model):
    #: Mean simulated time between failures (exponentially distributed), counted from each repair.
    mtbf: Positive
    #: Time to repair (fixed or a distribution).
    mttr: Duration


class WorkstationCapability(_Model):
    name: ShortName
    #: Processing time; may be omitted when every plan step using the capability gives its own.
    duration: Duration | None = None
    #: Set-up time added when the previous step on this workstation used another capability
    #: (a workstation starts set up for nothing, so its first step pays it too).
    setup: NonNegative = 0.0
    #: Price per simulated time unit of setup + processing.
    cost_rate: NonNegative = 1.0


class Workstation(_Model):
    kind: Literal["workstation"]
    name: ShortName
    location: Text
    capabilities: Annotated[list[WorkstationCapability], Field(min_length=1)]
    breakdown: Breakdown | None = None
    #: On a breakdown: ``finish_late`` resumes the interrupted step after the repair (it completes
    #: late); ``inform_failure`` abandons it with informFailure so the product bids it again.
    breakdown_policy: Literal["finish_late", "inform_failure"] = "finish_late"

    def capability(self, name: str) -> WorkstationCapability | None:
        return next((c for c in self.capabilities if c.name == name), None)

    def capability_names(self) -> list[str]:
        return [c.name for c in self.capabilities]

    @field_validator("capabilities")
    @classmethod
    def _unique_capabilities(cls, value: list[WorkstationCapability]) -> list[WorkstationCapability]:
        seen: set[str] = set()
        for cap in value:
            if cap.name in seen:
                raise ValueError(f"capability {cap.name!r} is listed twice")
            seen.add(cap.name)
        return value


class WarehouseOperation(_Model):
    duration: Duration | None = None
    cost_rate: NonNegative = 1.0

    @property
    def setup(self) -> float:
        return 0.0


class WarehouseCapabilities(_Model):
    #: Put a product (or item) into the warehouse; needs free capacity.
    store: WarehouseOperation | None = None
    #: Hand out an item (step parameter ``item``) from stock, or a stored product.
    retrieve: WarehouseOperation | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> WarehouseCapabilities:
        if self.store is None and self.retrieve is None:
            raise ValueError("a warehouse needs 'store' or 'retrieve' (or both)")
        return self


class Warehouse(_Model):
    kind: Literal["warehouse"]
    name: ShortName
    location: Text
    #: Units it can hold in total (stocked items + stored products).
    capacity: Annotated[int, Field(ge=1)]
    #: Initial stock: item short name -> count.
    stock: dict[ShortName, Annotated[int, Field(ge=0)]] = {}
    capabilities: WarehouseCapabilities

    def capability(self, name: str) -> WarehouseOperation | None:
        return getattr(self.capabilities, name) if name in WAREHOUSE_CAPABILITIES else None

    def capability_names(self) -> list[str]:
        return [n for n in WAREHOUSE_CAPABILITIES if getattr(self.capabilities, n) is not None]

    @model_validator(mode="after")
    def _stock_fits(self) -> Warehouse:
        total = sum(self.stock.values())
        if total > self.capacity:
            raise ValueError(f"initial stock ({total}) exceeds capacity ({self.capacity})")
        return self


Resource = Annotated[Union[Workstation, Warehouse], Field(discriminator="kind")]  # noqa: UP007


class Alternative(_Model):
    """One way to do a plan step: a capability, optionally with a step-specific duration."""

    capability: ShortName
    duration: Duration | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_plain_name(cls, value: Any) -> Any:
        return {"capability": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _as_plain_name(self, handler: Any) -> Any:
        return self.capability if self.duration is None else handler(self)


class PlanStep(_Model):
    """One manufacturing step: exactly one of ``capability`` or ``alternatives``."""

    name: Text | None = None
    capability: ShortName | None = None
    #: Capabilities any of which does the step; an entry is a name or ``{capability, duration}``.
    alternatives: Annotated[list[Alternative], Field(min_length=1)] | None = None
    #: Processing time of this step whatever resource does it (overrides the resource's
    #: capability duration; an alternative's own duration overrides this one).
    duration: Duration | None = None
    #: Sent with the call for proposal (e.g. ``item`` for a warehouse ``retrieve``).
    parameters: dict[Text, ParameterValue] = {}

    @model_validator(mode="after")
    def _one_way_to_name_the_capability(self) -> PlanStep:
        if self.capability is None and self.alternatives is None:
            raise ValueError("a plan step needs 'capability' or 'alternatives'")
        if self.capability is not None and self.alternatives is not None:
            raise ValueError("give either 'capability' or 'alternatives', not both")
        if self.alternatives is not None:
            names = [a.capability for a in self.alternatives]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                raise ValueError(f"alternatives list {', '.join(map(repr, dups))} more than once")
        return self

    def options(self) -> tuple[Alternative, ...]:
        """The ways to do this step, whichever form was written."""
        if self.alternatives is not None:
            return tuple(self.alternatives)
        assert self.capability is not None
        return (Alternative(capability=self.capability),)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(a.capability for a in self.options())


class ProductType(_Model):
    #: Free text; product instance short names are derived from it (see ``short_name_from``).
    name: Text
    plan: Annotated[list[PlanStep], Field(min_length=1)]

    @field_validator("plan")
    @classmethod
    def _unique_step_names(cls, value: list[PlanStep]) -> list[PlanStep]:
        names = [s.name for s in value if s.name is not None]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"step name(s) {', '.join(map(repr, dups))} used more than once")
        return value


class Order(_Model):
    type: Text
    quantity: Annotated[int, Field(ge=1)] = 1
    #: 1 = top priority (earliest completion) ... 5 = lowest (cheapest).
    priority: Annotated[int, Field(ge=1, le=5)] = 3
    #: Simulated time the first instance is released.
    release: NonNegative = 0.0
    #: Release of instance k (0-based) is ``release + k * interval``.
    interval: NonNegative = 0.0
    #: Absolute due time of every instance ...
    due: NonNegative | None = None
    #: ... or due relative to each instance's own release (give at most one of the two).
    lead_time: Positive | None = None
    vendor: ShortName | None = None
    #: Where the products are at release; null: at the resource doing their first step.
    location: Text | None = None

    @model_validator(mode="after")
    def _due_after_release(self) -> Order:
        if self.due is not None and self.lead_time is not None:
            raise ValueError("give either 'due' (absolute) or 'lead_time' (relative to release), not both")
        last_release = self.release + (self.quantity - 1) * self.interval
        if self.due is not None and self.due < last_release:
            which = "release" if self.quantity == 1 else f"last instance's release ({last_release:g})"
            raise ValueError(f"due ({self.due:g}) is before the {which}")
        return self

    def release_of(self, k: int) -> float:
        return self.release + k * self.interval

    def due_of(self, k: int) -> float | None:
        if self.lead_time is not None:
            return self.release_of(k) + self.lead_time
        return self.due


class Vendor(_Model):
    """A vendor allowed to submit product AASs over HTTP (used by the vendor/order-taking feature).

    Exactly one of ``api_key_hash`` (``sha256:<64 hex digits>`` of the key) or ``api_key_env``
    (name of the environment variable holding the key when the run starts).
    """

    name: ShortName
    api_key_hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: Where progress notifications are POSTed (http or https URL); null: no notifications.
    notify: str | None = None
    #: With ``api_key_env``: a run without that variable set goes on without this vendor (it
    #: cannot order over HTTP; a note says so) instead of being refused.
    optional: bool = False

    @field_validator("notify")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> Vendor:
        if (self.api_key_hash is None) == (self.api_key_env is None):
            raise ValueError("give exactly one of 'api_key_hash' and 'api_key_env'")
        return self


class BrokerTLS(_Model):
    """TLS on the listener of a broker the launcher starts (PEM files).

    Relative paths are read relative to the scenario file.  The certificate must name the host
    the agents connect to (``127.0.0.1`` for the launcher's brokers, e.g. ``subjectAltName =
    IP:127.0.0.1``).
    """

    #: The broker's certificate (PEM).
    cert: Text
    #: Its private key (PEM).
    key: Text
    #: The CA the agents and the recorder trust for the broker's certificate; null: the system's.
    ca: Text | None = None


class Security(_Model):
    """Who may connect to the broker and what each may do; see docs/security.md."""

    #: Per-agent accounts for the run and an ACL (each agent publishes only under its own name,
    #: reads its inbox, the calls for the capabilities it offers and events; an observer account
    #: reads everything).  Applies to a broker the launcher starts (null or 'mosquitto'); an
    #: external broker's accounts are its own.
    auth: bool = True
    #: TLS for the launcher's broker; null: plain TCP on the loopback interface.
    tls: BrokerTLS | None = None


class KillFault(_Model):
    #: Simulated time of the fault.
    at: NonNegative
    #: Short name of the agent (resource or product instance) to crash (in-process; see docs/scenarios.md).
    kill: ShortName
    #: Restart it this long after; null: it stays dead.
    restart_after: NonNegative | None = None


class BrokerFault(_Model):
    at: NonNegative
    restart_broker: Literal[True]
    #: How long the broker stays down before it is started again.
    down_for: NonNegative = 0.0


def _fault_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        if "kill" in value:
            return "kill-fault"
        if "restart_broker" in value:
            return "broker-fault"
        return None
    if isinstance(value, KillFault):
        return "kill-fault"
    if isinstance(value, BrokerFault):
        return "broker-fault"
    return None


Fault = Annotated[
    Union[Annotated[KillFault, Tag("kill-fault")], Annotated[BrokerFault, Tag("broker-fault")]],  # noqa: UP007
    Discriminator(
        _fault_tag,
        custom_error_type="fault_kind",
        custom_error_message="a fault needs either 'kill: <agent short name>' or 'restart_broker: true'",
    ),
]


class Stop(_Model):
    #: ``all_done``: stop when every product is finished (or failed), capped by max_time;
    #: ``max_time``: run until simulated max_time even if all is done.
    when: Literal["all_done", "max_time"] = "all_done"
    #: Simulated time limit.
    max_time: Positive | None = None
    #: Wall-clock limit in seconds (a safety net; the run is reported as timed out).
    wall_timeout: Positive | None = None

    @model_validator(mode="after")
    def _max_time_given(self) -> Stop:
        if self.when == "max_time" and self.max_time is None:
            raise ValueError("when: max_time needs a max_time")
        return self


class Benchmark(_Model):
    """Reference figures for schedule-quality runs (set by the job-shop converter)."""

    instance: Text
    #: Proven optimal makespan, when known.
    optimum: NonNegative | None = None
    #: A makespan known to be achievable (e.g. the original optimum for a flexible variant).
    upper_bound: NonNegative | None = None


#: Tags pydantic puts into error locations for tagged unions (the loader removes them).
UNION_TAGS: dict[str, type[BaseModel]] = {
    "workstation": Workstation,
    "warehouse": Warehouse,
    "kill-fault": KillFault,
    "broker-fault": BrokerFault,
}


# --------------------------------------------------------------------------- product instances


@dataclass(frozen=True)
class ProductInstance:
    """One product to manufacture, expanded from an order."""

    name: str  # short name: ``<sanitised type name>-<n>``, n counting from 1 per type
    type: str
    order: int  # index into Scenario.orders
    priority: int
    release: float
    due: float | None
    plan: tuple[PlanStep, ...]
    vendor: str | None
    location: str | None


# --------------------------------------------------------------------------- scenario


class CrossFieldErrors(ValueError):
    """All cross-field problems of a scenario, each with its own location (field path)."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in problems))


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


#: id(scenario.resources) -> (that list, its length, resources by name, resource names by capability);
#: the few latest scenarios' indexes (see Scenario._index).
_RESOURCE_INDEX: dict[int, tuple[list, int, dict[str, Any], dict[str, tuple[str, ...]]]] = {}


class Scenario(_Model):
    name: Text
    description: str | None = None
    #: Plant namespace: the ``{ns}`` in every MQTT topic.
    namespace: ShortName
    #: null: embedded broker; "mosquitto": a private mosquitto started by the launcher;
    #: otherwise an MQTT URL (mqtt://host:1883, mqtts://, ws://, wss://).
    broker: str | None = None
    #: null: SQLite in the run's output folder; otherwise a database URL.
    database: str | None = None
    #: Broker accounts, ACL and TLS (see :class:`Security`).
    security: Security = Security()
    clock: Clock = Clock()
    #: Seed of every random draw in the run (durations, breakdowns, flexible variants).
    seed: int = 0
    bidding: Bidding = Bidding()
    transport: Transport = Transport()
    resources: Annotated[list[Resource], Field(min_length=1)]
    product_types: Annotated[list[ProductType], Field(min_length=1)]
    orders: list[Order] = []
    #: Capability name -> semanticId, for capabilities not under the default base IRI.
    semantic_ids: dict[ShortName, Text] = {}
    vendors: list[Vendor] = []
    faults: list[Fault] = []
    stop: Stop = Stop()
    benchmark: Benchmark | None = None

    # ---- field-level checks

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        if value is None or value == "mosquitto":
            return value
        parts = urlsplit(value)
        if parts.scheme not in MQTT_URL_SCHEMES or not parts.hostname:
            raise ValueError(
                "must be null (embedded broker), 'mosquitto' (private mosquitto) or an MQTT URL "
                f"such as mqtt://host:1883 (got {value!r})"
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"bad port in broker URL {value!r}") from None
        return value

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.*", value, re.DOTALL):
            raise ValueError(
                "must be null (SQLite in the output folder) or a database URL such as "
                f"sqlite:///run.db or postgresql+psycopg://user@host/db (got {value!r})"
            )
        return value

    @property
    def broker_mode(self) -> Literal["embedded", "mosquitto", "external"]:
        if self.broker is None:
            return "embedded"
        return "mosquitto" if self.broker == "mosquitto" else "external"

    # ---- helpers

    def capabilities(self) -> dict[str, tuple[str, ...]]:
        """Capability name -> names of the resources offering it (sorted by capability)."""
        offered = self._index()[1]
        return {cap: offered[cap] for cap in sorted(offered)}

    def offering(self, capability: str) -> tuple[str, ...]:
        """Names of the resources offering ``capability`` (a lookup: the launcher asks once per
        step of every product, and rebuilding the map each time made a 10,000-agent plant's
        start-up quadratic)."""
        return self._index()[1].get(capability, ())

    def _index(self) -> tuple[dict[str, Resource], dict[str, tuple[str, ...]]]:
        """Resources by name and by capability, built once (rebuilt if the list was changed in place)."""
        # Kept beside the model, not in it: a private attribute would take part in ==.
        resources = self.resources
        cached = _RESOURCE_INDEX.get(id(resources))
        if cached is None or cached[0] is not resources or cached[1] != len(resources):
            by_name: dict[str, Resource] = {}
            offered: dict[str, list[str]] = {}
            for res in resources:
                by_name.setdefault(res.name, res)
                for cap in res.capability_names():
                    offered.setdefault(cap, []).append(res.name)
            cached = (resources, len(resources), by_name, {c: tuple(n) for c, n in offered.items()})
            while len(_RESOURCE_INDEX) >= 8:
                del _RESOURCE_INDEX[next(iter(_RESOURCE_INDEX))]
            _RESOURCE_INDEX[id(resources)] = cached
        return cached[2], cached[3]

    def locations(self) -> list[str]:
        """Every location named by a resource or an order, in order of first appearance."""
        seen: dict[str, None] = {}
        for res in self.resources:
            seen.setdefault(res.location, None)
        for order in self.orders:
            if order.location is not None:
                seen.setdefault(order.location, None)
        return list(seen)

    def resource(self, name: str) -> Workstation | Warehouse:
        try:
            return self._index()[0][name]
        except KeyError:
            raise KeyError(name) from None

    def product_type(self, name: str) -> ProductType:
        for pt in self.product_types:
            if pt.name == name:
                return pt
        raise KeyError(name)

    def semantic_id(self, capability: str) -> str:
        return self.semantic_ids.get(capability, CAPABILITY_SEMANTIC_ID_BASE + capability)

    def processing_time(
        self, step: PlanStep, resource: str, capability: str | None = None
    ) -> Duration | None:
        """The duration of ``step`` on ``resource`` (via ``capability``, default: the first the
        resource offers): the alternative's own duration, else the step's, else the resource's.
        None when the resource cannot do the step that way."""
        res = self.resource(resource)
        for alt in step.options():
            if capability is not None and alt.capability != capability:
                continue
            offer = res.capability(alt.capability)
            if offer is None:
                continue
            return alt.duration or step.duration or offer.duration
        return None

    def missing_vendor_keys(self, env: Mapping[str, str]) -> list[str]:
        """One line per vendor whose key variable is not set in ``env`` and that the scenario does
        not mark ``optional``: such a run could not take that vendor's orders, so `validate` and
        `run` refuse it rather than start a plant that only half works."""
        return [
            f"vendors[{i}].api_key_env: environment variable {v.api_key_env} is not set "
            f"(vendor {v.name!r}); set it, or mark the vendor 'optional: true' to run without it"
            for i, v in enumerate(self.vendors)
            if v.api_key_env and not v.optional and not env.get(v.api_key_env)
        ]

    def product_instances(self) -> list[ProductInstance]:
        """Every product instance, in order of the orders; names ``<type>-<n>`` with ``<type>``
        the sanitised type name and n counting from 1 per type across all orders."""
        types = {pt.name: pt for pt in self.product_types}
        counters: dict[str, int] = {}
        out: list[ProductInstance] = []
        for index, order in enumerate(self.orders):
            ptype = types[order.type]
            prefix = short_name_from(ptype.name)
            for k in range(order.quantity):
                counters[prefix] = counters.get(prefix, 0) + 1
                out.append(
                    ProductInstance(
                        name=f"{prefix}-{counters[prefix]}",
                        type=ptype.name,
                        order=index,
                        priority=order.priority,
                        release=order.release_of(k),
                        due=order.due_of(k),
                        plan=tuple(ptype.plan),
                        vendor=order.vendor,
                        location=order.location,
                    )
                )
        return out

    def agent_names(self) -> list[str]:
        """Short names of every agent of the run: resources, then product instances."""
        return [r.name for r in self.resources] + [p.name for p in self.product_instances()]

    # ---- cross-field checks

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        problems = list(self._problems())
        if problems:
            raise CrossFieldErrors(problems)
        return self

    def _problems(self) -> Iterator[tuple[tuple[str | int, ...], str]]:
        # Resource names unique.
        first_at: dict[str, int] = {}
        for i, res in enumerate(self.resources):
            if res.name in first_at:
                yield (
                    ("resources", i, "name"),
                    f"duplicate name {res.name!r} (also resources[{first_at[res.name]}])",
                )
            else:
                first_at[res.name] = i
        offered = self.capabilities()
        items = {item for r in self.resources if isinstance(r, Warehouse) for item in r.stock}

        # Product types: names unique, also once sanitised into short-name prefixes.
        type_at: dict[str, int] = {}
        prefix_at: dict[str, int] = {}
        for i, pt in enumerate(self.product_types):
            prefix = short_name_from(pt.name)
            if pt.name in type_at:
                yield (
                    ("product_types", i, "name"),
                    (f"duplicate product type {pt.name!r} (also product_types[{type_at[pt.name]}])"),
                )
                continue
            type_at[pt.name] = i
            if not prefix:
                yield (
                    ("product_types", i, "name"),
                    (f"cannot derive a short name from {pt.name!r}: use letters or digits"),
                )
            elif prefix in prefix_at:
                other = self.product_types[prefix_at[prefix]].name
                yield (
                    ("product_types", i, "name"),
                    (
                        f"{pt.name!r} and {other!r} (product_types[{prefix_at[prefix]}]) give the same "
                        f"product short names '{prefix}-<n>'"
                    ),
                )
            else:
                prefix_at[prefix] = i
            yield from self._plan_problems(i, pt, offered, items)

        # semantic ids only for offered capabilities.
        for cap in self.semantic_ids:
            if cap not in offered:
                yield ("semantic_ids", cap), f"no resource offers capability {cap!r}"

        # Orders.
        vendors = {v.name for v in self.vendors}
        for i, vendor in enumerate(self.vendors):
            if [v.name for v in self.vendors].index(vendor.name) != i:
                yield ("vendors", i, "name"), f"duplicate vendor {vendor.name!r}"
        total = 0
        for i, order in enumerate(self.orders):
            total += order.quantity
            if order.type not in type_at:
                known = ", ".join(repr(t) for t in type_at) or "none"
                yield ("orders", i, "type"), f"unknown product type {order.type!r} (known: {known})"
            if order.vendor is not None and order.vendor not in vendors:
                known = ", ".join(repr(v) for v in vendors) or "none declared under 'vendors'"
                yield ("orders", i, "vendor"), f"unknown vendor {order.vendor!r} (known: {known})"
        if total > MAX_PRODUCT_INSTANCES:
            yield ("orders",), f"{total} product instances; at most {MAX_PRODUCT_INSTANCES} are allowed"
            return  # do not expand them

        # Product short names must not collide with resource names.
        products: set[str] = set()
        products_known = all(o.type in type_at for o in self.orders) and len(prefix_at) == len(type_at)
        if products_known:
            products = {p.name for p in self.product_instances()}
            for i, res in enumerate(self.resources):
                if res.name in products:
                    yield (
                        ("resources", i, "name"),
                        (f"{res.name!r} is also the short name of a product instance; rename the resource"),
                    )

        # Transport legs name known locations, once each.
        locations = set(self.locations())
        pairs: dict[tuple[str, str], int] = {}
        for i, leg in enumerate(self.transport.legs):
            for field, loc in (("from", leg.from_), ("to", leg.to)):
                if loc not in locations:
                    yield (
                        ("transport", "legs", i, field),
                        (f"unknown location {loc!r} (known: {', '.join(map(repr, self.locations()))})"),
                    )
            if leg.from_ == leg.to:
                yield ("transport", "legs", i), "a leg from a location to itself (that time is always 0)"
            key = (leg.from_, leg.to)
            if key in pairs:
                yield (
                    ("transport", "legs", i),
                    f"leg {leg.from_!r} -> {leg.to!r} also given at legs[{pairs[key]}]",
                )
            pairs.setdefault(key, i)

        # Faults name known agents; a broker restart needs a broker the launcher controls.
        resource_names = set(first_at)
        for i, fault in enumerate(self.faults):
            if (
                isinstance(fault, KillFault)
                and products_known
                and fault.kill not in resource_names | products
            ):
                yield (
                    ("faults", i, "kill"),
                    (f"unknown agent {fault.kill!r}: not a resource nor a product instance of this scenario"),
                )
            if isinstance(fault, BrokerFault) and self.broker_mode == "external":
                yield (
                    ("faults", i, "restart_broker"),
                    ("the launcher can only restart a broker it starts (broker: null or 'mosquitto')"),
                )

        if self.security.tls is not None and self.broker_mode == "external":
            yield (
                ("security", "tls"),
                (
                    "TLS is set up only on a broker the launcher starts (broker: null or 'mosquitto'); "
                    "for an external broker use an mqtts:// URL with ?ca=..."
                ),
            )

        if self.stop.max_time is not None:
            for i, fault in enumerate(self.faults):
                if fault.at > self.stop.max_time:
                    yield (
                        ("faults", i, "at"),
                        f"after stop.max_time ({self.stop.max_time:g}): it would never happen",
                    )

    def _plan_problems(
        self, i: int, pt: ProductType, offered: dict[str, tuple[str, ...]], items: set[str]
    ) -> Iterator[tuple[tuple[str | int, ...], str]]:
        for j, step in enumerate(pt.plan):
            where: tuple[str | int, ...] = ("product_types", i, "plan", j)
            caps = step.capabilities
            doable = [c for c in caps if c in offered]
            if not doable:
                if step.capability is not None:
                    yield (
                        (*where, "capability"),
                        f"unknown capability {step.capability!r}: no resource offers it",
                    )
                else:
                    yield (
                        (*where, "alternatives"),
                        (f"no resource offers any of {', '.join(map(repr, caps))}: nobody can do this step"),
                    )
                continue
            for alt in step.options():
                for res_name in offered.get(alt.capability, ()):
                    offer = self.resource(res_name).capability(alt.capability)
                    if alt.duration is None and step.duration is None and offer.duration is None:  # type: ignore[union-attr]
                        yield (
                            where,
                            (
                                f"no processing time for capability {alt.capability!r} on resource {res_name!r}: "
                                "give 'duration' on the step or on the resource's capability"
                            ),
                        )
            item = step.parameters.get("item")
            if "retrieve" in caps and isinstance(item, str) and item not in items:
                stocked = ", ".join(map(repr, sorted(items))) or "nothing"
                yield (
                    (*where, "parameters", "item"),
                    (f"no warehouse stocks item {item!r} (stocked: {stocked}): nobody can retrieve it"),
                )
