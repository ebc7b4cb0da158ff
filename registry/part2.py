"""HTTP plumbing shared by the AAS registry and the per-agent AAS servers (AAS Part 2 API v3.1).

Why here: both the registry service and ``agents/aas/server.py`` speak the same Part 2 dialect
(base64url identifiers in URLs, ``Result``/``Message`` error bodies, ``paging_metadata`` cursors,
a body-size limit) and both run uvicorn *inside* an already running asyncio loop. ``registry`` may
not import ``agents``, but ``agents`` may import ``registry``, so the one copy lives here.

Nothing in this module touches the AAS metamodel; it is pure HTTP/JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import socket
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .identifiers import MalformedIdentifier, b64url_decode, b64url_encode

log = logging.getLogger(__name__)

JSON = "application/json"

# ---------------------------------------------------------------------------------------------------------------------
# Errors: the spec's Result / Message body
# ---------------------------------------------------------------------------------------------------------------------


def utc_timestamp() -> str:
    """A Message timestamp: the spec's pattern only admits UTC (``Z``/``+00:00``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def result_body(
    status: int, text: str, *, message_type: str = "Error", correlation_id: str | None = None
) -> bytes:
    """Serialise a Part 2 ``Result`` with one ``Message`` (code = HTTP status, as the reference servers do)."""
    message: dict[str, Any] = {
        "code": str(status),
        "messageType": message_type,
        "text": text,
        "timestamp": utc_timestamp(),
    }
    if correlation_id:
        message["correlationId"] = correlation_id[:128]
    return json.dumps({"messages": [message]}, ensure_ascii=False).encode("utf-8")


def error_response(status: int, text: str, *, headers: dict[str, str] | None = None) -> Response:
    return Response(result_body(status, text), status_code=status, media_type=JSON, headers=headers)


class ApiError(Exception):
    """Raise from a handler to answer with the spec's error body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class BodyTooLarge(Exception):
    """Raised by :class:`BodyLimitMiddleware` while a chunked body is being read."""


def install_error_handlers(app: FastAPI) -> None:
    """Map every error path (ours, routing 404/405, parameter validation, crashes) to a ``Result`` body."""

    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.text)

    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        text = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, text, headers=getattr(exc, "headers", None))

    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}")
        return error_response(400, "; ".join(parts) or "invalid request")

    async def _too_large(_: Request, exc: BodyTooLarge) -> Response:
        return error_response(413, str(exc) or "request body too large")

    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-request (it was stopped or crashed): nothing to answer, nothing broken.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return error_response(400, "client disconnected before the request body arrived")

    async def _crash(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error in HTTP handler", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(BodyTooLarge, _too_large)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)


class BodyLimitMiddleware:
    """Refuse request bodies above ``max_bytes`` with 413, before they are buffered.

    A declared ``Content-Length`` above the limit is refused at once; a chunked body is counted as it
    streams in and the handler's ``receive`` raises :class:`BodyTooLarge` (turned into 413 by the
    exception handler) once the limit is passed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "invalid Content-Length")(scope, receive, send)
                    return
                if declared > limit:
                    await _drain_and_reply(scope, receive, send, limit)
                    return
                break
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _drain_and_reply(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    # Answer without reading the body; uvicorn closes the connection if the body stays unread.
    await error_response(413, f"request body exceeds {limit} bytes")(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------------
# Query parameters and paging
# ---------------------------------------------------------------------------------------------------------------------


def parse_limit(raw: str | None, *, default: int | None = None, maximum: int = 10_000) -> int | None:
    """``limit`` must be an integer >= 1 (spec); larger values are capped, not refused."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw[:40]!r}") from None
    if value < 1:
        raise ApiError(400, "limit must be >= 1")
    return min(value, maximum)


def parse_cursor(raw: str | None) -> str | None:
    """Cursors are opaque to clients; ours are the base64url of the last identifier returned."""
    if raw is None or raw == "":
        return None
    try:
        return b64url_decode(raw)
    except MalformedIdentifier:
        raise ApiError(400, "malformed cursor") from None


def make_cursor(last_id: str) -> str:
    return b64url_encode(last_id)


def page_ids(ids: Iterable[str], limit: int | None, cursor: str | None) -> tuple[list[str], str | None]:
    """Sort, start after ``cursor``, cut at ``limit``; return the page and the next cursor (or None)."""
    ordered = sorted(ids)
    if cursor is not None:
        import bisect

        ordered = ordered[bisect.bisect_right(ordered, cursor) :]
    if limit is None or len(ordered) <= limit:
        return ordered, None
    page = ordered[:limit]
    return page, make_cursor(page[-1])


def paged_body(items: Sequence[bytes], next_cursor: str | None) -> bytes:
    """Assemble ``{"result": [...], "paging_metadata": {...}}`` from pre-serialised items (no re-encoding)."""
    meta = b"{}" if next_cursor is None else b'{"cursor":"' + next_cursor.encode("ascii") + b'"}'
    return b'{"result":[' + b",".join(items) + b'],"paging_metadata":' + meta + b"}"


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A plain response with an already-serialised JSON body (cheaper than JSONResponse re-encoding)."""
    return Response(body, status_code=status, media_type=JSON, headers=headers)


#: How deep a request body may nest (objects and arrays). The deepest body the APIs take, a
#: submodel of nested collections, needs about four levels per collection; what reads a parsed
#: body (basyx, pydantic, json.dumps) recurses once per level, so a body near Python's recursion
#: limit failed there (500) even when the parser took it.
MAX_JSON_DEPTH = 200


def json_depth_exceeds(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests deeper than `limit` (iteratively: no recursion of its own)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


async def read_json_body(request: Request) -> Any:
    """Read and parse a JSON request body; empty or malformed bodies, and bodies nested deeper
    than MAX_JSON_DEPTH, are a 400 with the spec's body."""
    raw = await request.body()
    if not raw:
        raise ApiError(400, "request body is required")
    too_deep = f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    try:
        data = json.loads(raw)
    except RecursionError:  # a body nested 100,000 deep: the parser's own recursion gave up
        raise ApiError(400, too_deep) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if json_depth_exceeds(data):
        raise ApiError(400, too_deep)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# uvicorn inside the running event loop
# ---------------------------------------------------------------------------------------------------------------------


# httptools (uvicorn[standard]) parses HTTP several times faster than h11; fall back when it is absent.
_HTTP_IMPL = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


class _EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves the host process's signal handlers alone and stops without polling delay."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        # uvicorn's loop sleeps 0.1 s between ticks; wake at once when asked to exit.
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 0.1)
            should_exit = await self.on_tick(counter)


class InLoopServer:
    """Run an ASGI app with uvicorn as a task of the *current* event loop.

    The listening socket is bound here (not by uvicorn) so that port 0 works, the real port is known
    before serving starts, and a bind failure raises ``OSError`` instead of uvicorn's ``sys.exit``.
    Signal handlers and logging configuration of the host process are not touched.
    """

    def __init__(self, app: ASGIApp, *, log_level: str = "warning", **config: Any) -> None:
        self.app = app
        self._log_level = log_level
        self._config = config
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.host: str | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None or self.host is None:
            raise RuntimeError("server not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind, start serving, and return the base URL (with the real port when ``port`` was 0)."""
        if self._task is not None:
            raise RuntimeError("server already started")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.host = host
        self.port = sock.getsockname()[1]
        options: dict[str, Any] = {
            "lifespan": "off",
            "log_config": None,
            "log_level": self._log_level,
            "access_log": False,
            "http": _HTTP_IMPL,
            "ws": "none",
            "proxy_headers": False,
            "server_header": False,
            "timeout_graceful_shutdown": 5,
        }
        options.update(self._config)
        config = uvicorn.Config(self.app, **options)
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"uvicorn:{self.port}")
        self._sock = sock
        while not self._server.started:
            if self._task.done():
                sock.close()
                exc = self._task.exception()
                self._task = None
                raise RuntimeError(f"HTTP server failed to start: {exc!r}")
            await asyncio.sleep(0.002)
        return self.base_url

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` seconds), then close."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.request_exit()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:  # the serve task crashed; nothing left to stop
            log.exception("HTTP server task ended with an error")
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._task = None
            self._server = None
