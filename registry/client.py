"""Async client of the registry (and the retry policy shared with :mod:`agents.aas.client`).

Retries cover *transient* failures only: connection errors and 502/503/504. Idempotent requests (GET,
PUT, DELETE — registration uses PUT) are retried on any transport error; POST only when the request
cannot have reached the server (connect errors) or the server said 503. Other 4xx/5xx answers raise
:class:`HttpError` (:class:`NotFound`, :class:`Conflict`, :class:`BadRequest`) at once, with the
messages of the spec's ``Result`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from protocol.tokens import RunTokens

from .descriptors import EXPIRES_HEADER, LEASE_HEADER, SHORT_NAME_EXT, short_name_of
from .identifiers import b64url_encode

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({502, 503, 504})
BULK_PATH = "/twinbid/bulk/shell-descriptors"  # the registry's bulk extension (registry/service.py)
BULK_MAX_BYTES = 192 * 1024  # under the registry's default body limit (256 KiB)
LOOKUP_PATH = "/twinbid/bulk/lookup"  # the registry's bulk lookup extension
LOOKUP_MAX = 2000  # ids + capabilities in one lookup (the registry's limit)
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})


class HttpError(Exception):
    """A non-transient error answer (or a transient one that outlasted the retries)."""

    def __init__(
        self,
        status: int,
        text: str,
        messages: list[dict[str, Any]] | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(f"{method} {url} -> {status}: {text}")
        self.status = status
        self.text = text
        self.messages = messages or []


class BadRequest(HttpError):
    pass


class NotFound(HttpError):
    pass


class Conflict(HttpError):
    pass


class Unauthorized(HttpError):
    """401: the request proved no agent's name (no token, a wrong or an expired one)."""


class Forbidden(HttpError):
    """403: the agent the token names may not do this (not the owner)."""


class _TransientStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def error_from(response: httpx.Response) -> HttpError:
    messages: list[dict[str, Any]] = []
    text = response.reason_phrase or "error"
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        body = response.json()
        messages = list(body.get("messages") or [])
        if messages:
            text = "; ".join(str(m.get("text", "")) for m in messages)
    cls = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}.get(
        response.status_code, HttpError
    )
    return cls(response.status_code, text, messages, response.request.method, str(response.request.url))


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    attempts: int = 4,
    max_delay: float = 10.0,
    ok: tuple[int, ...] = (),
    safe: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """Send with the transient-only retry policy; raise :class:`HttpError` for error answers not in ``ok``.
    ``safe``: a POST that only reads (retried like a GET)."""
    idempotent = safe or method.upper() in IDEMPOTENT

    def transient(exc: BaseException) -> bool:
        if isinstance(exc, _TransientStatus):
            return idempotent or exc.response.status_code == 503
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return True
        return idempotent and isinstance(exc, httpx.TransportError)

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(max_delay),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        retry=retry_if_exception(transient),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                response = await client.request(method, url, **kwargs)
                if response.status_code in TRANSIENT_STATUS and response.status_code not in ok:
                    raise _TransientStatus(response)
    except _TransientStatus as exc:
        raise error_from(exc.response) from None
    if response.status_code >= 400 and response.status_code not in ok:
        raise error_from(response)
    return response


@dataclass
class _Chunk:
    items: list[dict[str, Any]]
    body: bytes


def _byte_chunks(descriptors: list[dict[str, Any]], max_bytes: int) -> Iterator[_Chunk]:
    """JSON arrays of the descriptors, each at most ``max_bytes`` (a descriptor larger than that
    alone is sent alone)."""
    items: list[dict[str, Any]] = []
    parts: list[bytes] = []
    size = 2
    for d in descriptors:
        encoded = json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if items and size + len(encoded) + 1 > max_bytes:
            yield _Chunk(items, b"[" + b",".join(parts) + b"]")
            items, parts, size = [], [], 2
        items.append(d)
        parts.append(encoded)
        size += len(encoded) + 1
    if items:
        yield _Chunk(items, b"[" + b",".join(parts) + b"]")


def _short_name_ext(name: str) -> dict[str, str]:
    return {"name": SHORT_NAME_EXT, "valueType": "xs:string", "value": name}


class RegistryClient:
    """``RegistryClient(base_url)``: register / renew / deregister / look up shell descriptors.

    With ``tokens`` (the run's, :mod:`protocol.tokens`) each write carries a bearer token naming
    the agents whose descriptors it writes (their ``twinbid:shortName``); ``agent`` names the
    writer of standalone submodel descriptors, which name no agent. The registry refuses
    anonymous writes (401) and descriptors of other agents (403).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 4,
        client: httpx.AsyncClient | None = None,
        tokens: RunTokens | None = None,
        agent: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.tokens = tokens
        self.agent = agent
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._registered: dict[str, tuple[dict[str, Any], float | None]] = {}
        self._owners: dict[str, str] = {}  # aas id -> the agent it was registered for (kept after)
        self._keepalive: dict[str, asyncio.Task[None]] = {}
        self._bulk = True  # until the registry answers the bulk extension with 404/405
        self._bulk_lookup = True  # likewise for the bulk lookup

    async def aclose(self) -> None:
        for task in self._keepalive.values():
            task.cancel()
        for task in list(self._keepalive.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._keepalive.clear()
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _url(self, path: str) -> str:
        return path if self._own_client else f"{self.base_url}{path}"

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await send(self._client, method, self._url(path), attempts=self.attempts, **kwargs)

    def _auth(self, descriptors: Iterable[dict[str, Any] | None] = ()) -> dict[str, str]:
        """The Authorization header naming the agents of ``descriptors`` (or ``agent``)."""
        names = tuple(dict.fromkeys(n for d in descriptors if d and (n := short_name_of(d))))
        for d in descriptors:
            if d and d.get("id") and short_name_of(d):
                self._owners[d["id"]] = short_name_of(d)  # type: ignore[assignment]
        names = names or ((self.agent,) if self.agent else ())
        if self.tokens is None or not names:
            return {}
        return {"Authorization": f"Bearer {self.tokens.token_for(names)}"}

    # -- shells -------------------------------------------------------------------------------------------------------

    async def register(self, descriptor: dict[str, Any], ttl: float | None = None) -> float | None:
        """Create or replace a shell descriptor (PUT, so retries are safe). Returns the lease expiry (epoch s)."""
        headers = {LEASE_HEADER: repr(float(ttl))} if ttl else {}
        response = await self._send(
            "PUT",
            f"/shell-descriptors/{b64url_encode(descriptor['id'])}",
            json=descriptor,
            headers={**headers, **self._auth([descriptor])},
        )
        self._registered[descriptor["id"]] = (descriptor, ttl)
        expires = response.headers.get(EXPIRES_HEADER)
        return float(expires) if expires else None

    async def register_many(
        self, descriptors: list[dict[str, Any]], ttl: float | None = None, *, max_bytes: int = BULK_MAX_BYTES
    ) -> float | None:
        """Create or replace many shell descriptors in as few requests as fit ``max_bytes`` each
        (the extension ``PUT /twinbid/bulk/shell-descriptors``; safe to retry). A registry without
        the extension (404/405) gets one PUT per descriptor. Returns the lease expiry (epoch s).

        Why: one HTTP exchange per agent was most of a swarm's start-up CPU, on both ends.
        """
        headers = {LEASE_HEADER: repr(float(ttl))} if ttl else {}
        expires: float | None = None
        for chunk in _byte_chunks(descriptors, max_bytes):
            if self._bulk:
                response = await self._send(
                    "PUT", BULK_PATH, content=chunk.body, ok=(404, 405),
                    headers={**headers, **self._auth(chunk.items), "content-type": "application/json"},
                )  # fmt: skip
                if response.status_code in (404, 405):
                    self._bulk = False
                else:
                    for d in chunk.items:
                        self._registered[d["id"]] = (d, ttl)
                    value = response.headers.get(EXPIRES_HEADER)
                    expires = float(value) if value else expires
                    continue
            for d in chunk.items:
                expires = await self.register(d, ttl)
        return expires

    async def lookup(
        self, ids: Iterable[str] = (), capabilities: Iterable[str] = ()
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Many lookups at once: live descriptors by id (unknown ids left out) and the shells
        offering each capability semanticId — one request per ``LOOKUP_MAX`` (the extension
        ``POST /twinbid/bulk/lookup``); a registry without it gets one standard request each.

        Why: an agent's first message from each peer and each capability it calls for needed a
        lookup of its own, a fifth of an agent process's CPU in a 10,000-agent start-up."""
        ids, capabilities = list(dict.fromkeys(ids)), list(dict.fromkeys(capabilities))
        by_id: dict[str, dict[str, Any]] = {}
        by_cap: dict[str, list[dict[str, Any]]] = {}
        items = [("id", x) for x in ids] + [("capability", x) for x in capabilities]
        for start in range(0, len(items), LOOKUP_MAX):
            chunk = items[start : start + LOOKUP_MAX]
            want_ids = [x for kind, x in chunk if kind == "id"]
            want_caps = [x for kind, x in chunk if kind == "capability"]
            if self._bulk_lookup:
                response = await self._send(
                    "POST",
                    LOOKUP_PATH,
                    json={"ids": want_ids, "capabilities": want_caps},
                    ok=(404, 405),
                    safe=True,
                )
                if response.status_code not in (404, 405):
                    body = response.json()
                    by_id.update(body.get("ids") or {})
                    by_cap.update(body.get("capabilities") or {})
                    continue
                self._bulk_lookup = False
            for aas_id in want_ids:
                found = await self.get(aas_id)
                if found is not None:
                    by_id[aas_id] = found
            for cap in want_caps:
                by_cap[cap] = await self.find_by_capability(cap)
        return by_id, by_cap

    async def renew(self, aas_id: str, ttl: float | None = None) -> float | None:
        """Renew the lease of a descriptor registered through this client (re-PUTs it; recreates it if it expired)."""
        try:
            descriptor, old_ttl = self._registered[aas_id]
        except KeyError:
            raise KeyError(f"{aas_id!r} was not registered through this client") from None
        return await self.register(descriptor, ttl if ttl is not None else old_ttl)

    async def deregister(self, aas_id: str) -> bool:
        """Delete a shell descriptor; False if it was not there (or had expired)."""
        self.stop_keepalive(aas_id)
        self._registered.pop(aas_id, None)
        owner = self._owners.get(aas_id)
        auth = self._auth([{"id": aas_id, "extensions": [_short_name_ext(owner)]} if owner else None])
        response = await self._send(
            "DELETE", f"/shell-descriptors/{b64url_encode(aas_id)}", ok=(404,), headers=auth
        )
        return response.status_code == 204

    def keepalive(self, aas_id: str, interval: float | None = None) -> asyncio.Task[None]:
        """Renew the lease every ``interval`` seconds (default: a third of the TTL) until deregistered/closed."""
        descriptor, ttl = self._registered[aas_id]
        period = interval or (ttl / 3 if ttl else None)
        if not period:
            raise ValueError("keepalive needs a TTL or an interval")
        self.stop_keepalive(aas_id)

        async def loop() -> None:
            # The first renewal at a random point of the period: agents registered together
            # (a whole swarm at start-up) would otherwise renew together, every period.
            delay = period * random.uniform(0.5, 1.0)
            while True:
                await asyncio.sleep(delay)
                delay = period
                try:
                    await self.renew(aas_id)
                except (HttpError, httpx.HTTPError) as exc:
                    log.warning("renewing the lease of %s failed: %s", aas_id, exc)

        task = asyncio.create_task(loop(), name=f"registry-keepalive:{descriptor.get('idShort', aas_id)}")
        self._keepalive[aas_id] = task
        return task

    def stop_keepalive(self, aas_id: str) -> None:
        task = self._keepalive.pop(aas_id, None)
        if task is not None:
            task.cancel()

    async def get(self, aas_id: str) -> dict[str, Any] | None:
        response = await self._send("GET", f"/shell-descriptors/{b64url_encode(aas_id)}", ok=(404,))
        return None if response.status_code == 404 else response.json()

    async def _all(self, path: str, params: dict[str, str], page_size: int) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            query = dict(params, limit=str(page_size))
            if cursor:
                query["cursor"] = cursor
            body = (await self._send("GET", path, params=query)).json()
            for item in body.get("result", []):
                yield item
            cursor = (body.get("paging_metadata") or {}).get("cursor")
            if not cursor:
                return

    async def list(self, *, page_size: int = 500, **filters: str) -> list[dict[str, Any]]:
        """All live shell descriptors (following cursors); ``filters`` are query parameters."""
        return [d async for d in self._all("/shell-descriptors", filters, page_size)]

    async def find_by_capability(self, semantic_id: str, *, page_size: int = 500) -> list[dict[str, Any]]:
        """Shell descriptors offering a capability (extension ``twinbid:capabilities``)."""
        return [d async for d in self._all("/shell-descriptors", {"capability": semantic_id}, page_size)]

    async def find_by_short_name(self, short_name: str) -> dict[str, Any] | None:
        found = [d async for d in self._all("/shell-descriptors", {"shortName": short_name}, 2)]
        return found[0] if found else None

    # -- submodel registry ------------------------------------------------------------------------------------------

    async def register_submodel(self, descriptor: dict[str, Any], ttl: float | None = None) -> None:
        headers = {LEASE_HEADER: repr(float(ttl))} if ttl else {}
        await self._send(
            "PUT",
            f"/submodel-descriptors/{b64url_encode(descriptor['id'])}",
            json=descriptor,
            headers={**headers, **self._auth()},
        )

    async def get_submodel(self, submodel_id: str) -> dict[str, Any] | None:
        response = await self._send("GET", f"/submodel-descriptors/{b64url_encode(submodel_id)}", ok=(404,))
        return None if response.status_code == 404 else response.json()

    async def deregister_submodel(self, submodel_id: str) -> bool:
        response = await self._send(
            "DELETE", f"/submodel-descriptors/{b64url_encode(submodel_id)}", ok=(404,), headers=self._auth()
        )
        return response.status_code == 204
