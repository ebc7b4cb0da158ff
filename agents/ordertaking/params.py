"""The order parameters that come with an upload: product type, priority, due, notification URL, customization.

They arrive as query parameters (``POST /orders?productType=gear&priority=2``), as multipart form fields, or as
input arguments of the ``TakeOrder`` operation — under the same names everywhere. Every problem is reported
at once, each with its field (422).
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from agents.aas.build import to_id_short

from .errors import Problem, Rejection

__all__ = ["FIELDS", "OrderParams", "check_notify_url", "parse_order_params", "resolve_product_type"]

FIELDS = ("productType", "priority", "due", "notificationUrl", "customization")
DEFAULT_PRIORITY = 3
MAX_CUSTOMIZATION_KEYS = 64
MAX_TEXT = 1000


class SimClock(Protocol):
    def now(self) -> float: ...
    def from_epoch_ms(self, ms: int) -> float: ...


@dataclass(frozen=True)
class OrderParams:
    product_type: str
    priority: int
    due: float | None
    notify_url: str | None
    customization: dict[str, Any] = field(default_factory=dict)


def check_notify_url(url: str, *, allow_private: bool = True) -> str | None:
    """None if ``url`` is usable as a notification endpoint, else why not."""
    if len(url) > 2048:
        return "longer than 2048 characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL (got scheme {parts.scheme or 'none'!r})"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@); deliveries are signed instead"
    if parts.fragment:
        return "must not have a #fragment"
    if port == 0:
        return "port 0 is not a valid port"
    if not allow_private:
        host = parts.hostname
        if host == "localhost" or host.endswith(".localhost"):
            return "points at this machine; this service only notifies public addresses"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_reserved
            or ip.is_multicast
            or ip.is_unspecified
        ):
            return "is a private, loopback or reserved address; this service only notifies public addresses"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_order_params(
    raw: Mapping[str, Any],
    *,
    product_types: Mapping[str, Any],
    default_type: str | None = None,
    default_notify: str | None = None,
    clock: SimClock | None = None,
    allow_private_notify: bool = True,
    type_optional: bool = False,
) -> OrderParams:
    """Check the parameters; :class:`Rejection` 422 listing every problem with its field.

    ``type_optional``: a missing product type is not (yet) a problem — the result has ``product_type == ""``
    and the caller resolves it later (from the shell's ``assetType``) with :func:`resolve_product_type`.
    """
    problems: list[Problem] = []
    unknown = sorted(k for k in raw if k not in FIELDS)
    for k in unknown:
        problems.append(Problem(k, f"unknown parameter; expected {', '.join(FIELDS)}"))

    # product type: given, or the shell's assetInformation.assetType
    product_type = raw.get("productType")
    if product_type in (None, ""):
        product_type = default_type
    known = ", ".join(sorted(map(repr, product_types))) or "none"
    if product_type in (None, ""):
        if type_optional:
            product_type = ""
        else:
            problems.append(
                Problem(
                    "productType", f"missing (and the shell names no assetType); known product types: {known}"
                )
            )
    elif not isinstance(product_type, str) or product_type not in product_types:
        problems.append(
            Problem("productType", f"unknown product type {str(product_type)[:100]!r}; known: {known}")
        )

    # priority 1..5
    priority: int = DEFAULT_PRIORITY
    raw_priority = raw.get("priority")
    if raw_priority not in (None, ""):
        value: Any = raw_priority
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            problems.append(
                Problem(
                    "priority",
                    f"must be an integer from 1 (top: earliest completion) to 5 (lowest: cheapest), got {str(raw_priority)[:40]!r}",
                )
            )
        else:
            priority = value

    # due: simulated time units, or an ISO 8601 date-time with offset when the service knows the clock
    due: float | None = None
    raw_due = raw.get("due")
    if raw_due not in (None, ""):
        number = _number(raw_due)
        if number is not None:
            if not math.isfinite(number) or number < 0:
                problems.append(
                    Problem("due", f"must be a finite, non-negative simulated time, got {raw_due!r}")
                )
            else:
                due = number
        elif isinstance(raw_due, str) and clock is not None:
            try:
                moment = datetime.fromisoformat(raw_due.strip().replace("Z", "+00:00"))
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None:
                problems.append(
                    Problem(
                        "due",
                        f"must be a number (simulated time) or an ISO 8601 date-time with offset, got {raw_due[:60]!r}",
                    )
                )
            else:
                due = clock.from_epoch_ms(int(moment.timestamp() * 1000))
        else:
            problems.append(
                Problem("due", f"must be a number (simulated time units), got {str(raw_due)[:60]!r}")
            )
        if due is not None and clock is not None and due < clock.now():
            problems.append(Problem("due", f"is in the past (simulated time now: {clock.now():g})"))
            due = None

    # notification URL
    notify = raw.get("notificationUrl")
    if notify in (None, ""):
        notify = default_notify
    elif not isinstance(notify, str):
        problems.append(Problem("notificationUrl", "must be a URL string"))
        notify = None
    else:
        why = check_notify_url(notify, allow_private=allow_private_notify)
        if why:
            problems.append(Problem("notificationUrl", why))
            notify = None

    # customization: a flat JSON object of scalars
    customization: dict[str, Any] = {}
    raw_custom = raw.get("customization")
    if raw_custom not in (None, ""):
        value = raw_custom
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                value = None
        if not isinstance(value, dict):
            problems.append(
                Problem("customization", "must be a JSON object of names to text, numbers or booleans")
            )
        elif len(value) > MAX_CUSTOMIZATION_KEYS:
            problems.append(Problem("customization", f"at most {MAX_CUSTOMIZATION_KEYS} entries"))
        else:
            seen: dict[str, str] = {}
            for k, v in value.items():
                where = f"customization.{k}"[:100]
                if not isinstance(k, str) or not 1 <= len(k) <= 64:
                    problems.append(Problem(where, "names must be 1..64 characters"))
                    continue
                id_short = to_id_short(k)
                if id_short in seen:
                    problems.append(
                        Problem(where, f"clashes with {seen[id_short]!r} (both become {id_short!r})")
                    )
                    continue
                seen[id_short] = k
                ok = isinstance(v, str | bool | int) or (isinstance(v, float) and math.isfinite(v))
                if not ok:
                    problems.append(Problem(where, "must be text, a number or a boolean"))
                elif isinstance(v, str) and len(v) > MAX_TEXT:
                    problems.append(Problem(where, f"text longer than {MAX_TEXT} characters"))
                elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63:
                    problems.append(Problem(where, "integer out of range"))
                else:
                    customization[k] = v
    if problems:
        raise Rejection(422, problems)
    assert isinstance(product_type, str)
    return OrderParams(product_type, priority, due, notify, customization)


def resolve_product_type(
    params: OrderParams, asset_type: str | None, product_types: Mapping[str, Any]
) -> OrderParams:
    """Fill a missing product type from the shell's ``assetInformation.assetType`` (422 if that is no help)."""
    if params.product_type:
        return params
    known = ", ".join(sorted(map(repr, product_types))) or "none"
    if not asset_type:
        raise Rejection(
            422,
            Problem(
                "productType", f"missing (and the shell names no assetType); known product types: {known}"
            ),
        )
    if asset_type not in product_types:
        raise Rejection(
            422,
            Problem(
                "productType",
                f"missing, and the shell's assetType {asset_type[:100]!r} is no known product type; known: {known}",
            ),
        )
    return OrderParams(asset_type, params.priority, params.due, params.notify_url, params.customization)
