"""Why an order is refused: problems with the field they concern, as the Part 2 ``Result`` body."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from registry.part2 import utc_timestamp

__all__ = ["OrderRejected", "Problem", "Rejection", "result_json"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: the field (query parameter, form field, AAS path) and the reason."""

    field: str | None
    reason: str

    @property
    def text(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


def result_json(status: int, problems: Iterable[Problem], message_type: str = "Error") -> dict[str, Any]:
    """``{"messages": [{"code", "messageType", "text", "timestamp", "field"?}, ...]}`` (Part 2 ``Result``).

    ``field`` is an addition of ours (the schema allows additional properties): the parameter or AAS element
    the message is about, so a client can point at it without parsing the text.
    """
    stamp = utc_timestamp()
    messages = []
    for p in problems:
        m: dict[str, Any] = {
            "code": str(status),
            "messageType": message_type,
            "text": p.text,
            "timestamp": stamp,
        }
        if p.field:
            m["field"] = p.field
        messages.append(m)
    return {"messages": messages}


class Rejection(Exception):
    """A request refused with ``status`` and one message per problem (raised anywhere in the intake)."""

    def __init__(
        self,
        status: int,
        problems: Problem | str | Iterable[Problem],
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(problems, str):
            items = [Problem(None, problems)]
        elif isinstance(problems, Problem):
            items = [problems]
        else:
            items = list(problems)
        self.status = status
        self.problems = items
        self.headers = headers or {}
        super().__init__(self.text)

    @classmethod
    def field(cls, status: int, field: str | None, reason: str) -> Rejection:
        return cls(status, Problem(field, reason))

    @property
    def text(self) -> str:
        return "; ".join(p.text for p in self.problems)

    def body(self) -> bytes:
        return json.dumps(result_json(self.status, self.problems), ensure_ascii=False).encode("utf-8")

    def response(self) -> Response:
        return Response(
            self.body(), status_code=self.status, media_type="application/json", headers=self.headers
        )


class OrderRejected(Rejection):
    """Raise from the ``on_order`` callback to refuse an order the plant cannot take (default 422)."""

    def __init__(self, reason: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(status, Problem(field, reason))
