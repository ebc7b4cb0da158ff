"""Async client for another agent's AAS server (the Part 2 routes served by :mod:`agents.aas.server`).

Reads come back as basyx objects; writes take basyx objects. Transient failures (connection errors,
502/503/504) are retried with the shared policy of :func:`registry.client.send`; POST (create element,
invoke) is retried only when it cannot have been processed. Errors raise
:class:`registry.client.HttpError` subclasses (``NotFound``, ``Conflict``, ``BadRequest``).

Writes carry the writing agent's bearer token (``token``: a callable, so a cached token is renewed
before it expires; :mod:`protocol.tokens`): the servers refuse anonymous writes with 401.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from basyx.aas import model

from registry.client import BadRequest, Conflict, HttpError, NotFound, send
from registry.identifiers import b64url_encode

from .io import element_from_json, shell_from_json, submodel_from_json, to_json

__all__ = ["AasClient", "BadRequest", "Conflict", "HttpError", "NotFound", "OperationResult"]


@dataclass
class OperationResult:
    execution_state: str
    success: bool
    outputs: list[model.SubmodelElement] = field(default_factory=list)
    inoutputs: list[model.SubmodelElement] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def output_values(self) -> dict[str, Any]:
        return {e.id_short: (e.value if isinstance(e, model.Property) else e) for e in self.outputs}


def _variables(raw: Any) -> list[model.SubmodelElement]:
    return [element_from_json(v["value"]) for v in raw or ()]


class AasClient:
    """``AasClient(base_url)`` — ``base_url`` is the AAS server root (see ``registry.descriptors.aas_server_base``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 4,
        client: httpx.AsyncClient | None = None,
        token: Callable[[], str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self._token = token
        self._own = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def __aenter__(self) -> AasClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _sm(self, submodel_id: str) -> str:
        return f"{self.base_url}/submodels/{b64url_encode(submodel_id)}"

    def _el(self, submodel_id: str, path: str) -> str:
        return f"{self._sm(submodel_id)}/submodel-elements/{path}"

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self._token is not None:  # writes need it; reads too where a server protects them
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {self._token()}"}
        return await send(self._client, method, url, attempts=self.attempts, **kwargs)

    @staticmethod
    def _body(obj: object) -> dict[str, Any]:
        return {"content": to_json(obj).encode("utf-8"), "headers": {"Content-Type": "application/json"}}

    # -- reads --------------------------------------------------------------------------------------------------------

    async def get_shell(self, aas_id: str) -> model.AssetAdministrationShell:
        response = await self._send("GET", f"{self.base_url}/shells/{b64url_encode(aas_id)}")
        return shell_from_json(response.content)

    async def get_submodel_refs(self, aas_id: str) -> list[str]:
        response = await self._send("GET", f"{self.base_url}/shells/{b64url_encode(aas_id)}/submodel-refs")
        return [ref["keys"][-1]["value"] for ref in response.json()["result"]]

    async def get_submodel(self, submodel_id: str) -> model.Submodel:
        response = await self._send("GET", self._sm(submodel_id))
        return submodel_from_json(response.content)

    async def get_submodel_json(self, submodel_id: str) -> dict[str, Any]:
        return (await self._send("GET", self._sm(submodel_id))).json()

    async def get_submodel_value(self, submodel_id: str) -> dict[str, Any]:
        """The ValueOnly form (``{"Priority": 1, ...}``) — the cheapest way to read a few values."""
        return (await self._send("GET", f"{self._sm(submodel_id)}/$value")).json()

    async def get_element(self, submodel_id: str, path: str) -> model.SubmodelElement:
        response = await self._send("GET", self._el(submodel_id, path))
        return element_from_json(response.content)

    async def get_element_value(self, submodel_id: str, path: str) -> Any:
        return (await self._send("GET", f"{self._el(submodel_id, path)}/$value")).json()

    # -- writes -------------------------------------------------------------------------------------------------------

    async def put_element(self, submodel_id: str, path: str, element: model.SubmodelElement) -> bool:
        """Create or replace the element at ``path`` (idempotent). Returns True if it was created."""
        response = await self._send("PUT", self._el(submodel_id, path), **self._body(element))
        return response.status_code == 201

    async def patch_element(
        self, submodel_id: str, path: str, element: model.SubmodelElement | dict[str, Any]
    ) -> None:
        """Merge ``element`` (an object, or its AAS JSON) into the existing one (collections merge
        their children by idShort)."""
        await self._send("PATCH", self._el(submodel_id, path), **self._body(element))

    async def post_element(
        self, submodel_id: str, element: model.SubmodelElement, parent_path: str | None = None
    ) -> model.SubmodelElement:
        """Create ``element`` at the submodel root or inside ``parent_path``; ``Conflict`` if it exists."""
        url = (
            self._el(submodel_id, parent_path)
            if parent_path
            else f"{self._sm(submodel_id)}/submodel-elements"
        )
        response = await self._send("POST", url, **self._body(element))
        return element_from_json(response.content)

    async def delete_element(self, submodel_id: str, path: str) -> None:
        await self._send("DELETE", self._el(submodel_id, path))

    async def invoke(
        self,
        submodel_id: str,
        path: str,
        inputs: Iterable[model.SubmodelElement] | Mapping[str, Any] = (),
        inoutputs: Iterable[model.SubmodelElement] = (),
        *,
        client_timeout: float | None = None,
    ) -> OperationResult:
        """Invoke an Operation synchronously. ``inputs`` may be elements or ``{idShort: value}`` (Properties)."""
        if isinstance(inputs, Mapping):
            from .build import prop

            inputs = [prop(k, v) for k, v in inputs.items()]
        body: dict[str, Any] = {
            "inputArguments": [{"value": json.loads(to_json(e))} for e in inputs],
            "inoutputArguments": [{"value": json.loads(to_json(e))} for e in inoutputs],
        }
        if client_timeout is not None:  # the server stops waiting after this long (xs:duration)
            body["clientTimeoutDuration"] = f"PT{client_timeout:g}S"
        response = await self._send("POST", f"{self._el(submodel_id, path)}/invoke", json=body)
        data = response.json()
        return OperationResult(
            execution_state=data.get("executionState", ""),
            success=bool(data.get("success")),
            outputs=_variables(data.get("outputArguments")),
            inoutputs=_variables(data.get("inoutputArguments")),
            messages=list(data.get("messages") or []),
        )
