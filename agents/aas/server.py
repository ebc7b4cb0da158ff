"""One HTTP listener per agent process serving the AASs of all agents in it (AAS Part 2 API v3.1 subset).

Routes (identifiers base64url without padding; errors as the spec's ``Result``; see docs/api.md):

* ``GET /shells`` (``limit``, ``cursor``, ``idShort``, ``assetIds``), ``GET /shells/{aasIdentifier}``,
  ``GET /shells/{aasIdentifier}/submodel-refs``
* ``GET /submodels`` (``limit``, ``cursor``, ``idShort``, ``semanticId``), ``GET /submodels/{id}``
  (``level=deep|core``), ``GET /submodels/{id}/$value``
* ``GET|POST /submodels/{id}/submodel-elements``
* ``GET|PUT|PATCH|POST|DELETE /submodels/{id}/submodel-elements/{idShortPath}``,
  ``GET .../{idShortPath}/$value``, ``POST .../{idShortPath}/invoke``
* ``GET /description``, ``GET /openapi.json``

Writes never touch the basyx objects here: they become :class:`~agents.aas.store.WriteRequest` s handed to
the owning agent (single writer, see :mod:`agents.aas.store`). Every write is authenticated first: it must
carry a bearer token of the run naming an agent (:mod:`protocol.tokens`), else 401; the owner then
authorizes it (403/409). Refusals change nothing, are logged and counted in ``refused`` (by status). Reads
are open unless ``protect_reads`` is set (then they need a token too). uvicorn runs inside the caller's event loop:
``base_url = await server.start(port=0)`` ... ``await server.stop()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections import Counter
from typing import Any

from basyx.aas import model
from fastapi import FastAPI, Request
from starlette.responses import Response

from protocol.tokens import AuthError, RunTokens
from registry.part2 import (
    ApiError,
    BodyLimitMiddleware,
    InLoopServer,
    MalformedIdentifier,
    b64url_decode,
    b64url_encode,
    error_response,
    install_error_handlers,
    json_bytes,
    json_response,
    make_cursor,
    page_ids,
    paged_body,
    parse_cursor,
    parse_limit,
    read_json_body,
)

from .io import AasReadError, element_from_json
from .store import (
    AasStore,
    InvokeRequest,
    StoreError,
    WriteKind,
    WriteRejected,
    WriteRequest,
    _encode,
    operation_variables_json,
    parse_operation_arguments,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "PROFILES", "AasServer", "create_app"]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

PROFILES = [
    "https://admin-shell.io/aas/API/3/1/AssetAdministrationShellRepositoryServiceSpecification/SSP-002",
    "https://admin-shell.io/aas/API/3/1/SubmodelRepositoryServiceSpecification/SSP-002",
]

_DURATION = re.compile(r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def _decode(segment: str, what: str) -> str:
    if segment.startswith("$"):  # a spec modifier route we do not serve ($metadata, $reference, $path ...)
        raise ApiError(501, f"the {segment[:40]} modifier is not implemented by this server")
    try:
        return b64url_decode(segment)
    except MalformedIdentifier as exc:
        raise ApiError(400, f"{what}: {exc}") from None


def _parse_duration(raw: Any) -> float | None:
    if raw is None:
        return None
    match = _DURATION.match(raw) if isinstance(raw, str) and raw not in ("P", "PT") else None
    if match is None:
        raise ApiError(
            400, f"clientTimeoutDuration must be an xs:duration of days/hours/minutes/seconds, got {raw!r}"
        )
    d, h, m, s = (float(match.group(k) or 0) for k in "dhms")
    return ((d * 24 + h) * 60 + m) * 60 + s


def _check_path(path: str) -> str:
    if path.startswith("$"):
        raise ApiError(501, f"the {path} modifier is not implemented by this server")
    try:
        model.Referable.parse_id_short_path(path)
    except (ValueError, model.AASConstraintViolation) as exc:
        raise ApiError(400, f"malformed idShortPath {path[:100]!r}: {exc}") from None
    return path


def _core(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``level=core``: keep the direct children, drop their children."""
    out = dict(data)
    children = []
    for el in data.get(key, []):
        el = dict(el)
        for nested in ("value", "statements", "annotations"):
            if (
                el.get("modelType")
                in (
                    "SubmodelElementCollection",
                    "SubmodelElementList",
                    "Entity",
                    "AnnotatedRelationshipElement",
                )
                and nested in el
            ):
                del el[nested]
        children.append(el)
    if key in out:
        out[key] = children
    return out


def _level(request: Request, allowed: tuple[str, ...] = ("deep", "core")) -> str:
    level = request.query_params.get("level", allowed[0])
    if level not in allowed:
        raise ApiError(400, f"level must be one of {', '.join(allowed)}")
    extent = request.query_params.get("extent", "withoutBlobValue")
    if extent not in ("withBlobValue", "withoutBlobValue"):
        raise ApiError(400, "extent must be withBlobValue or withoutBlobValue")
    return level


def _store_error(exc: StoreError) -> ApiError:
    return ApiError(exc.status, exc.text)


def create_app(
    store: AasStore,
    *,
    tokens: RunTokens | None = None,
    protect_reads: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    title: str = "twinbid AAS server",
) -> FastAPI:
    """The FastAPI app over ``store`` (exposed for tests and for mounting behind another ASGI server).

    ``tokens`` checks the bearer tokens of writes; without it the server accepts no write at all
    (401): nobody can prove a name to it. ``app.state.refused`` counts refused writes by status.
    """
    app = FastAPI(
        title=title,
        version="3.1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        description="AAS Part 2 API v3.1 subset (AAS and Submodel Repository) — see docs/api.md",
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    refused: Counter[str] = Counter()
    app.state.refused = refused

    def refuse(request: Request, status: int, text: str, caller: str | None = None) -> ApiError:
        refused[str(status)] += 1
        log.warning(
            "refused %s %s from %s: %d %s",
            request.method,
            request.url.path[:200],
            caller or "an unauthenticated caller",
            status,
            text,
        )
        return ApiError(status, text)

    def authenticate(request: Request) -> str:
        if tokens is None:
            raise refuse(request, 401, "this AAS server has no credentials of a run: it accepts no writes")
        try:
            return tokens.caller(request.headers.get("authorization"))
        except AuthError as exc:
            raise refuse(request, 401, exc.text) from None

    if protect_reads:

        @app.middleware("http")
        async def reads_need_a_token(request: Request, call_next: Any) -> Response:
            if request.method in ("GET", "HEAD") and request.url.path not in (
                "/description",
                "/openapi.json",
            ):
                try:
                    authenticate(request)
                except ApiError as exc:
                    return error_response(exc.status, exc.text)
            return await call_next(request)

    # ------------------------------------------------------------------------------------------------ description

    description = json_bytes({"profiles": PROFILES})

    @app.get("/description", operation_id="GetSelfDescription", tags=["Description API"])
    async def get_description() -> Response:
        return json_response(description)

    # ------------------------------------------------------------------------------------------------ shells

    @app.get(
        "/shells",
        operation_id="GetAllAssetAdministrationShells",
        tags=["Asset Administration Shell Repository API"],
    )
    async def get_shells(request: Request) -> Response:
        q = request.query_params
        limit = parse_limit(q.get("limit"))
        cursor = parse_cursor(q.get("cursor"))
        id_short = q.get("idShort")
        asset_ids = [_parse_asset_id(raw) for raw in q.getlist("assetIds")]
        ids = []
        for aas in store.shells():
            if id_short and aas.id_short != id_short:
                continue
            if asset_ids and not all(_has_asset_id(aas, name, value) for name, value in asset_ids):
                continue
            ids.append(aas.id)
        page, next_cursor = page_ids(ids, limit, cursor)
        return json_response(paged_body([store.shell_json(i) or b"null" for i in page], next_cursor))

    @app.get(
        "/shells/{aasIdentifier}",
        operation_id="GetAssetAdministrationShellById",
        tags=["Asset Administration Shell Repository API"],
    )
    async def get_shell(aasIdentifier: str) -> Response:
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        body = store.shell_json(aas_id)
        if body is None:
            raise ApiError(404, f"shell {aas_id!r} not found")
        return json_response(body)

    @app.get(
        "/shells/{aasIdentifier}/submodel-refs",
        operation_id="GetAllSubmodelReferences_AasRepository",
        tags=["Asset Administration Shell Repository API"],
    )
    async def get_submodel_refs(aasIdentifier: str, request: Request) -> Response:
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        limit = parse_limit(request.query_params.get("limit"))
        cursor = parse_cursor(request.query_params.get("cursor"))
        aas = store.get_shell(aas_id)
        if aas is None:
            raise ApiError(404, f"shell {aas_id!r} not found")
        refs = {ref.get_identifier(): ref for ref in aas.submodel}
        page, next_cursor = page_ids(refs, limit, cursor)
        return json_response(paged_body([_encode(refs[i]) for i in page], next_cursor))

    # ------------------------------------------------------------------------------------------------ submodels

    @app.get("/submodels", operation_id="GetAllSubmodels", tags=["Submodel Repository API"])
    async def get_submodels(request: Request) -> Response:
        q = request.query_params
        limit = parse_limit(q.get("limit"))
        cursor = parse_cursor(q.get("cursor"))
        level = _level(request)
        id_short = q.get("idShort")
        semantic_id = _decode(q["semanticId"], "semanticId") if q.get("semanticId") else None
        ids = []
        for sm in store.submodels():
            if id_short and sm.id_short != id_short:
                continue
            if semantic_id and not _has_semantic_id(sm, semantic_id):
                continue
            ids.append(sm.id)
        page, next_cursor = page_ids(ids, limit, cursor)
        items = [store.submodel_json(i) or b"null" for i in page]
        if level == "core":
            items = [json_bytes(_core(json.loads(b), "submodelElements")) for b in items]
        return json_response(paged_body(items, next_cursor))

    @app.get(
        "/submodels/{submodelIdentifier}", operation_id="GetSubmodelById", tags=["Submodel Repository API"]
    )
    async def get_submodel(submodelIdentifier: str, request: Request) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        level = _level(request) if request.query_params else "deep"
        body = store.submodel_json(sm_id)
        if body is None:
            raise ApiError(404, f"submodel {sm_id!r} not found")
        if level == "core":
            body = json_bytes(_core(json.loads(body), "submodelElements"))
        return json_response(body)

    @app.get(
        "/submodels/{submodelIdentifier}/$value",
        operation_id="GetSubmodelById-ValueOnly",
        tags=["Submodel Repository API"],
    )
    async def get_submodel_value(submodelIdentifier: str, request: Request) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        _level(request)
        try:
            return json_response(json_bytes(store.value_only(sm_id, None)))
        except StoreError as exc:
            raise _store_error(exc) from None

    @app.get(
        "/submodels/{submodelIdentifier}/submodel-elements",
        operation_id="GetAllSubmodelElements",
        tags=["Submodel Repository API"],
    )
    async def get_elements(submodelIdentifier: str, request: Request) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        limit = parse_limit(request.query_params.get("limit"))
        cursor = parse_cursor(request.query_params.get("cursor"))
        level = _level(request)
        sm = store.get_submodel(sm_id)
        if sm is None:
            raise ApiError(404, f"submodel {sm_id!r} not found")
        elements = list(sm.submodel_element)  # model order, not sorted: the cursor is the last idShort sent
        start = 0
        if cursor is not None:
            names = [el.id_short for el in elements]
            if cursor not in names:
                raise ApiError(400, "cursor does not point into this submodel (the element was removed)")
            start = names.index(cursor) + 1
        end = len(elements) if limit is None else min(len(elements), start + limit)
        page_elements = elements[start:end]
        next_cursor = (
            make_cursor(page_elements[-1].id_short) if end < len(elements) and page_elements else None
        )
        items = [_encode(el) for el in page_elements]
        if level == "core":
            items = [json_bytes(_core({"value": [json.loads(b)]}, "value")["value"][0]) for b in items]
        return json_response(paged_body(items, next_cursor))

    # ------------------------------------------------------------------------------------------------ elements

    @app.get(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}",
        operation_id="GetSubmodelElementByPath_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def get_element(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        path = _check_path(idShortPath)
        level = _level(request) if request.query_params else "deep"
        try:
            element = store.resolve(sm_id, path)
        except StoreError as exc:
            raise _store_error(exc) from None
        body = _encode(element)
        if level == "core":
            body = json_bytes(_core({"value": [json.loads(body)]}, "value")["value"][0])
        return json_response(body)

    @app.get(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/$value",
        operation_id="GetSubmodelElementByPath-ValueOnly_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def get_element_value(submodelIdentifier: str, idShortPath: str) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        path = _check_path(idShortPath)
        try:
            return json_response(json_bytes(store.value_only(sm_id, path)))
        except StoreError as exc:
            raise _store_error(exc) from None

    async def write(kind: WriteKind, sm_segment: str, path: str | None, request: Request) -> Response:
        caller = authenticate(request)  # before anything is looked up: a stranger learns nothing
        sm_id = _decode(sm_segment, "submodelIdentifier")
        if path is not None:
            _check_path(path)
        owner = store.owner_of(sm_id)
        if owner is None or not store.has_submodel(sm_id):  # (a lookup: building it is for readers)
            raise ApiError(404, f"submodel {sm_id!r} not found")
        if kind is WriteKind.PUT:
            _level(request, ("deep",))
        elif kind is WriteKind.PATCH:
            _level(request, ("core",))
        element: model.SubmodelElement | None = None
        body: dict[str, Any] | None = None
        if kind is not WriteKind.DELETE:
            raw = await read_json_body(request)
            if not isinstance(raw, dict):
                raise ApiError(400, "request body must be a JSON object (a SubmodelElement)")
            body = raw
            try:
                element = element_from_json(body)
            except AasReadError as exc:
                raise ApiError(400, f"invalid SubmodelElement: {exc}") from None
        existed = True
        try:
            if kind is WriteKind.POST:
                container = store.resolve(sm_id, path)
                if not isinstance(
                    container,
                    model.Submodel
                    | model.SubmodelElementCollection
                    | model.SubmodelElementList
                    | model.Entity,
                ):
                    raise ApiError(400, f"{path!r} cannot contain elements")
                if (
                    element is not None
                    and element.id_short
                    and not isinstance(container, model.SubmodelElementList)
                    and _exists(container, element.id_short)
                ):
                    raise ApiError(
                        409,
                        f"an element {element.id_short!r} already exists at {path or 'the submodel root'}",
                    )
            elif kind is WriteKind.PUT:
                parts = model.Referable.parse_id_short_path(path or "")
                parent = model.Referable.build_id_short_path(parts[:-1]) if len(parts) > 1 else None
                if parent is not None:
                    store.resolve(sm_id, parent)
                elif store.owner_of(sm_id) is None:
                    raise StoreError(404, f"submodel {sm_id!r} not found")
                try:
                    store.has_element(sm_id, path or "")
                except StoreError as exc:
                    if exc.status != 404:
                        raise
                    existed = False
            else:
                store.has_element(sm_id, path or "")
        except StoreError as exc:
            raise _store_error(exc) from None
        op = WriteRequest(
            kind,
            sm_id,
            path,
            element,
            owner,
            body,
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
            caller=caller,
        )
        try:
            await store.submit(op)
        except WriteRejected as exc:
            if exc.status in (401, 403, 409):
                raise refuse(request, exc.status, exc.text, caller) from None
            raise ApiError(exc.status, exc.text) from None
        except StoreError as exc:
            raise _store_error(exc) from None
        if kind in (WriteKind.PATCH, WriteKind.DELETE) or (kind is WriteKind.PUT and existed):
            return Response(status_code=204)
        target = op.target_path
        try:
            created = store.resolve(sm_id, target)
            created_body = _encode(created)
        except StoreError:
            created_body = _encode(element)
        location = f"/submodels/{sm_segment}/submodel-elements/{target}"
        return json_response(created_body, 201, headers={"Location": location})

    @app.post(
        "/submodels/{submodelIdentifier}/submodel-elements",
        status_code=201,
        operation_id="PostSubmodelElement_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def post_element_root(submodelIdentifier: str, request: Request) -> Response:
        return await write(WriteKind.POST, submodelIdentifier, None, request)

    @app.post(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}",
        status_code=201,
        operation_id="PostSubmodelElementByPath_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def post_element(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        return await write(WriteKind.POST, submodelIdentifier, idShortPath, request)

    @app.put(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}",
        status_code=204,
        operation_id="PutSubmodelElementByPath_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def put_element(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        return await write(WriteKind.PUT, submodelIdentifier, idShortPath, request)

    @app.patch(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}",
        status_code=204,
        operation_id="PatchSubmodelElementByPath_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def patch_element(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        return await write(WriteKind.PATCH, submodelIdentifier, idShortPath, request)

    @app.delete(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}",
        status_code=204,
        operation_id="DeleteSubmodelElementByPath_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def delete_element(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        return await write(WriteKind.DELETE, submodelIdentifier, idShortPath, request)

    # ------------------------------------------------------------------------------------------------ operations

    @app.post(
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/invoke",
        operation_id="InvokeOperation_SubmodelRepo",
        tags=["Submodel Repository API"],
    )
    async def invoke(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        path = _check_path(idShortPath)
        try:
            operation = store.resolve(sm_id, path)
        except StoreError as exc:
            raise _store_error(exc) from None
        if not isinstance(operation, model.Operation):
            raise ApiError(405, f"{path!r} is a {type(operation).__name__}; only Operations can be invoked")
        raw = await read_json_body(request)
        if not isinstance(raw, dict):
            raise ApiError(400, "request body must be an OperationRequest object")
        timeout = _parse_duration(raw.get("clientTimeoutDuration"))
        try:
            inputs = parse_operation_arguments(raw.get("inputArguments"), "inputArguments")
            inouts = parse_operation_arguments(raw.get("inoutputArguments"), "inoutputArguments")
        except StoreError as exc:
            raise _store_error(exc) from None
        handler = store.operation_handler(sm_id, path)
        if handler is None:
            raise ApiError(501, f"operation {path!r} has no implementation registered")
        call = InvokeRequest(sm_id, path, operation, inputs, inouts, timeout)
        result: dict[str, Any]
        try:
            outputs = await asyncio.wait_for(handler(call), timeout)
            result = {
                "executionState": "Completed",
                "success": True,
                "outputArguments": operation_variables_json(list(outputs or ())),
                "inoutputArguments": operation_variables_json(inouts),
            }
        except TimeoutError:
            result = {
                "executionState": "Timeout",
                "success": False,
                "messages": [_message("Error", f"operation did not finish within {timeout} s")],
            }
        except WriteRejected as exc:
            raise ApiError(exc.status, exc.text) from None
        except Exception as exc:  # the operation failed; report it in the OperationResult
            result = {
                "executionState": "Failed",
                "success": False,
                "messages": [_message("Exception", f"{type(exc).__name__}: {exc}")],
            }
        return json_response(json_bytes(result))

    return app


def _message(kind: str, text: str) -> dict[str, Any]:
    from registry.part2 import utc_timestamp

    return {"code": "OperationResult", "messageType": kind, "text": text, "timestamp": utc_timestamp()}


def _parse_asset_id(raw: str) -> tuple[str, str]:
    try:
        data = json.loads(b64url_decode(raw))
        return str(data["name"]), str(data["value"])
    except (MalformedIdentifier, ValueError, KeyError, TypeError):
        raise ApiError(400, "assetIds must be base64url-encoded SpecificAssetId JSON objects") from None


def _has_asset_id(aas: model.AssetAdministrationShell, name: str, value: str) -> bool:
    info = aas.asset_information
    if name == "globalAssetId" and info.global_asset_id == value:
        return True
    return any(s.name == name and s.value == value for s in info.specific_asset_id)


def _exists(container: Any, id_short: str) -> bool:
    try:
        container.get_referable(id_short)
    except KeyError:
        return False
    return True


def _has_semantic_id(sm: model.Submodel, semantic_id: str) -> bool:
    return sm.semantic_id is not None and any(k.value == semantic_id for k in sm.semantic_id.key)


class AasServer:
    """The AAS server of one agent process: ``base_url = await AasServer(store).start(port=0)``."""

    def __init__(
        self,
        store: AasStore | None = None,
        *,
        tokens: RunTokens | None = None,
        protect_reads: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        title: str = "twinbid AAS server",
        log_level: str = "warning",
    ) -> None:
        self.store = store if store is not None else AasStore()
        self.app = create_app(
            self.store, tokens=tokens, protect_reads=protect_reads, max_body_bytes=max_body_bytes, title=title
        )
        self._http = InLoopServer(self.app, log_level=log_level)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running loop; returns the base URL with the real port (``port=0`` picks a free one)."""
        return await self._http.start(host, port)

    async def stop(self) -> None:
        await self._http.stop()

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def refused(self) -> Counter[str]:
        """Refused writes by HTTP status (``{"401": n, "403": m, "409": k}``)."""
        return self.app.state.refused

    @property
    def port(self) -> int | None:
        return self._http.port

    def shell_url(self, aas_id: str) -> str:
        return f"{self.base_url}/shells/{b64url_encode(aas_id)}"

    def submodel_url(self, submodel_id: str) -> str:
        return f"{self.base_url}/submodels/{b64url_encode(submodel_id)}"

    async def __aenter__(self) -> AasServer:
        if not self._http.running:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
