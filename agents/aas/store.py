"""In-memory home of the shells and submodels of the agents in one process, and the single-writer rule.

Every shell and submodel has an **owner** (the short name of the agent it belongs to). basyx objects are
not thread-safe and each agent must stay the single writer of its own AAS, so writes arriving over HTTP
are *not* applied by the HTTP handler: they are wrapped in a :class:`WriteRequest` and handed to the
owner's async write hook (:meth:`AasStore.set_write_hook`). The owner validates, persists and applies
(usually by calling :meth:`AasStore.apply`), or refuses by raising :class:`WriteRejected`. Without a
registered hook the store applies the write itself, but only the owner's own: a write whose
authenticated ``caller`` (the agent the HTTP server's bearer token named) is not the owner is refused
(403), so a resource's Capabilities, Status or Nameplate are changed by that resource alone. A hook
decides for itself who may write (a product's documentation: the resource awarded the step).

Reads are served from cached JSON: every mutation made through the store (``apply``, ``put_*``,
``edit()``) bumps a generation counter and drops the cached bytes. Code that mutates a basyx object held
by the store directly must call :meth:`AasStore.changed` (or use ``with store.edit(submodel_id):``), or
readers keep seeing the old JSON.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from basyx.aas import model

from .io import FastAASToJsonEncoder, from_json
from .valueonly import element_value_only

__all__ = [
    "AasStore",
    "InvokeRequest",
    "OperationHandler",
    "WriteHook",
    "WriteKind",
    "WriteRejected",
    "WriteRequest",
]


class WriteKind(StrEnum):
    PUT = "put"  # replace (or create) the element at ``path``; idempotent
    PATCH = "patch"  # merge the body into the existing element at ``path``
    POST = "post"  # create ``element`` inside ``path`` (None = the submodel root); 409 if it exists
    DELETE = "delete"  # remove the element at ``path``


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One write, as handed to the owner's hook. ``element`` is the parsed body (None for DELETE)."""

    kind: WriteKind
    submodel_id: str
    path: str | None
    element: model.SubmodelElement | None
    owner: str
    body: dict[str, Any] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: the authenticated agent making the write (None: nobody proved a name)
    caller: str | None = None

    @property
    def target_path(self) -> str:
        """The idShortPath the write ends up at (for POST: parent path + new idShort)."""
        if self.kind is WriteKind.POST:
            assert self.element is not None
            leaf = self.element.id_short or ""
            return f"{self.path}.{leaf}" if self.path else leaf
        return self.path or ""


class WriteRejected(Exception):
    """Raised by a write hook to refuse a write; becomes an HTTP error with the spec's ``Result`` body."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


WriteHook = Callable[[WriteRequest], Awaitable[None]]


@dataclass
class InvokeRequest:
    """A synchronous Operation invocation, as handed to the owner's operation handler."""

    submodel_id: str
    path: str
    operation: model.Operation
    input_arguments: list[model.SubmodelElement]
    inoutput_arguments: list[model.SubmodelElement]
    timeout: float | None = None

    def inputs(self) -> dict[str, Any]:
        """Input arguments by idShort; Properties give their Python value, other elements themselves."""
        return {
            e.id_short: (e.value if isinstance(e, model.Property) else e)
            for e in [*self.input_arguments, *self.inoutput_arguments]
        }


# The handler returns the output arguments (elements); in-out arguments may be modified in place.
OperationHandler = Callable[[InvokeRequest], Awaitable[Iterable[model.SubmodelElement] | None]]


def _encode(obj: object) -> bytes:
    return json.dumps(obj, cls=FastAASToJsonEncoder, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


@dataclass
class _Entry:
    obj: model.AssetAdministrationShell | model.Submodel
    owner: str
    generation: int = 0
    cached: bytes | None = None
    # Submodels: JSON of each top-level element, keyed by idShort, with the element object it was made from
    # (a replaced element is a different object, so it can never be served stale from here).
    parts: dict[str, tuple[object, bytes]] = field(default_factory=dict)
    # Submodels: top-level elements given as AAS JSON (put_element_json) and not yet built as basyx
    # objects; they replace the element of the same idShort, and are built on the first object read.
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)


class StoreError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class AasStore:
    """Shells and submodels of the agents in one process, each with an owner."""

    def __init__(self) -> None:
        self._shells: dict[str, _Entry] = {}
        self._submodels: dict[str, _Entry] = {}
        self._hooks: dict[str, WriteHook] = {}
        self._operations: dict[tuple[str, str], OperationHandler] = {}

    # -- contents -----------------------------------------------------------------------------------------------------

    def add(
        self, owner: str, shell: model.AssetAdministrationShell | None = None, *submodels: model.Submodel
    ) -> None:
        """Add (or replace) an agent's shell and submodels. The shell is linked to the submodels given."""
        for sm in submodels:
            self.put_submodel(sm, owner=owner)
        if shell is not None:
            known = {ref.get_identifier() for ref in shell.submodel}
            for sm in submodels:
                if sm.id not in known:
                    shell.submodel.add(model.ModelReference.from_referable(sm))
            self.put_shell(shell, owner=owner)

    def put_shell(self, shell: model.AssetAdministrationShell, *, owner: str) -> None:
        self._put(self._shells, shell, owner)

    def put_submodel(self, submodel: model.Submodel, *, owner: str) -> None:
        self._put(self._submodels, submodel, owner)

    @staticmethod
    def _put(table: dict[str, _Entry], obj: Any, owner: str) -> None:
        old = table.get(obj.id)
        if old is not None and old.owner != owner:
            raise ValueError(f"{obj.id} belongs to {old.owner!r}, not {owner!r}")
        table[obj.id] = _Entry(obj, owner, generation=(old.generation + 1) if old else 0)

    def remove(self, identifier: str) -> None:
        self._shells.pop(identifier, None)
        self._submodels.pop(identifier, None)
        for key in [k for k in self._operations if k[0] == identifier]:
            del self._operations[key]

    def remove_owner(self, owner: str) -> None:
        for table in (self._shells, self._submodels):
            for ident in [i for i, e in table.items() if e.owner == owner]:
                self.remove(ident)
        self._hooks.pop(owner, None)

    def get_shell(self, aas_id: str) -> model.AssetAdministrationShell | None:
        entry = self._shells.get(aas_id)
        return entry.obj if entry else None  # type: ignore[return-value]

    def has_submodel(self, submodel_id: str) -> bool:
        """Whether the submodel is hosted here (its pending elements stay JSON)."""
        return submodel_id in self._submodels

    def get_submodel(self, submodel_id: str) -> model.Submodel | None:
        entry = self._submodels.get(submodel_id)
        return self._materialize(entry).obj if entry else None  # type: ignore[return-value]

    def put_element_json(self, submodel_id: str, data: dict[str, Any]) -> None:
        """Put (or replace) a top-level element of a submodel given as AAS JSON, without building it.

        The hot path documents steps this way: readers of the JSON get it as given, and the
        basyx object is built only when someone asks for the submodel as objects. ``data`` must
        be valid AAS JSON of one SubmodelElement (the writer builds it; nothing is checked here).
        """
        entry = self._submodels.get(submodel_id)
        if entry is None:
            raise StoreError(404, f"submodel {submodel_id!r} not found")
        entry.pending[data["idShort"]] = data
        entry.generation += 1
        entry.cached = None

    def has_element(self, submodel_id: str, path: str) -> bool:
        """Whether ``path`` exists (StoreError 404/400 like :meth:`resolve`), without building pending elements."""
        entry = self._submodels.get(submodel_id)
        if entry is not None and path in entry.pending:
            return True
        self.resolve(submodel_id, path)
        return True

    @staticmethod
    def _materialize(entry: _Entry) -> _Entry:
        """Build the pending JSON elements into the basyx submodel (keeping their positions)."""
        if not entry.pending:
            return entry
        sm: model.Submodel = entry.obj  # type: ignore[assignment]
        pending, entry.pending = entry.pending, {}
        members = sm.submodel_element
        for id_short, data in pending.items():
            element = from_json(data, model.SubmodelElement)  # type: ignore[type-abstract]
            existing = _find(sm, id_short)
            if existing is None:
                members.add(element)
            else:
                _replace_in_place(members, existing, element)
            cached = entry.parts.get(id_short)
            if cached is not None and cached[0] is data:
                entry.parts[id_short] = (element, cached[1])  # the same JSON: keep the fragment
        return entry

    def owner_of(self, identifier: str) -> str | None:
        entry = self._submodels.get(identifier) or self._shells.get(identifier)
        return entry.owner if entry else None

    def shell_ids(self) -> list[str]:
        return list(self._shells)

    def submodel_ids(self) -> list[str]:
        return list(self._submodels)

    def shells(self, owner: str | None = None) -> list[model.AssetAdministrationShell]:
        return [e.obj for e in self._shells.values() if owner is None or e.owner == owner]  # type: ignore[misc]

    def submodels(self, owner: str | None = None) -> list[model.Submodel]:
        return [
            self._materialize(e).obj  # type: ignore[misc]
            for e in self._submodels.values()
            if owner is None or e.owner == owner
        ]

    def identifiables(self, owner: str | None = None) -> list[model.Identifiable]:
        return [*self.shells(owner), *self.submodels(owner)]

    # -- cache ----------------------------------------------------------------------------------------------------

    def changed(self, identifier: str, path: str | None = None) -> None:
        """Tell the store that a shell/submodel was mutated outside the store's own methods.

        ``path`` (an idShortPath) narrows it down for submodels: only the top-level element it starts with is
        serialised again on the next read; without it the whole submodel is.
        """
        for table in (self._submodels, self._shells):
            entry = table.get(identifier)
            if entry is not None:
                entry.generation += 1
                entry.cached = None
                if path is None:
                    entry.parts.clear()
                else:
                    entry.parts.pop(_top(path), None)

    @contextlib.contextmanager
    def edit(self, identifier: str, path: str | None = None) -> Iterator[Any]:
        """``with store.edit(submodel_id[, "Step003"]) as sm: ...`` — mutate, then the cached JSON is dropped
        (only the top-level element ``path`` starts with, when given)."""
        entry = self._submodels.get(identifier) or self._shells.get(identifier)
        if entry is None:
            raise KeyError(identifier)
        try:
            yield self._materialize(entry).obj
        finally:
            self.changed(identifier, path)

    def generation(self, identifier: str) -> int:
        entry = self._submodels.get(identifier) or self._shells.get(identifier)
        if entry is None:
            raise KeyError(identifier)
        return entry.generation

    def shell_json(self, aas_id: str) -> bytes | None:
        return self._json(self._shells.get(aas_id))

    def submodel_json(self, submodel_id: str) -> bytes | None:
        return self._json(self._submodels.get(submodel_id))

    @staticmethod
    def _json(entry: _Entry | None) -> bytes | None:
        if entry is None:
            return None
        if entry.cached is None:
            if isinstance(entry.obj, model.Submodel):
                entry.cached = _encode_submodel(entry.obj, entry.parts, entry.pending)
            else:
                entry.cached = _encode(entry.obj)
        return entry.cached

    # -- navigation -----------------------------------------------------------------------------------------------

    def resolve(self, submodel_id: str, path: str | None) -> model.Submodel | model.SubmodelElement:
        """The submodel (``path`` None/empty) or the element at ``path``; :class:`StoreError` 404/400 otherwise."""
        sm = self.get_submodel(submodel_id)
        if sm is None:
            raise StoreError(404, f"submodel {submodel_id!r} not found")
        if not path:
            return sm
        try:
            parts = model.Referable.parse_id_short_path(path)
        except (ValueError, model.AASConstraintViolation) as exc:
            raise StoreError(400, f"malformed idShortPath {path!r}: {exc}") from None
        try:
            return sm.get_referable(parts)  # type: ignore[return-value]
        except (KeyError, IndexError):
            raise StoreError(404, f"no element at {path!r} in submodel {submodel_id!r}") from None
        except (TypeError, ValueError) as exc:
            raise StoreError(404, f"no element at {path!r}: {exc}") from None

    # -- writes ---------------------------------------------------------------------------------------------------

    def set_write_hook(self, owner: str, hook: WriteHook | None) -> None:
        """Route HTTP writes on ``owner``'s submodels through ``hook`` (None restores the default: apply)."""
        if hook is None:
            self._hooks.pop(owner, None)
        else:
            self._hooks[owner] = hook

    async def submit(self, op: WriteRequest) -> None:
        """Hand a write to its owner (or apply the owner's own write when it registered no hook)."""
        hook = self._hooks.get(op.owner)
        if hook is None:
            if op.caller != op.owner:
                raise WriteRejected(
                    f"only {op.owner} writes its own AAS; {op.caller or 'an unauthenticated caller'} may not",
                    403,
                )
            self.apply(op)
        else:
            await hook(op)

    def apply(self, op: WriteRequest) -> bool:
        """Apply a write to the basyx objects. Returns True if something was created.

        PUT replaces (or creates) the element at ``op.path`` — applying it twice gives the same state.
        PATCH merges the body into the existing element (collections merge children by idShort).
        POST adds ``op.element`` under ``op.path`` (409 if the idShort is taken).
        """
        sm = self.get_submodel(op.submodel_id)
        if sm is None:
            raise StoreError(404, f"submodel {op.submodel_id!r} not found")
        try:
            if op.kind is WriteKind.POST:
                created = self._apply_post(sm, op)
            elif op.kind is WriteKind.PUT:
                created = self._apply_put(sm, op)
            elif op.kind is WriteKind.PATCH:
                self._apply_patch(sm, op)
                created = False
            elif op.kind is WriteKind.DELETE:
                self._apply_delete(sm, op)
                created = False
            else:  # pragma: no cover
                raise StoreError(400, f"unknown write kind {op.kind}")
        finally:
            self.changed(op.submodel_id, op.target_path or None)
        return created

    def _container(self, sm: model.Submodel, path: str | None) -> Any:
        target = self.resolve(sm.id, path)
        if not isinstance(
            target,
            model.Submodel | model.SubmodelElementCollection | model.SubmodelElementList | model.Entity,
        ):
            raise StoreError(400, f"{path!r} is a {type(target).__name__}, which cannot contain elements")
        return target

    @staticmethod
    def _members(container: Any) -> Any:
        if isinstance(container, model.Submodel):
            return container.submodel_element
        if isinstance(container, model.Entity):
            return container.statement
        return container.value

    def _apply_post(self, sm: model.Submodel, op: WriteRequest) -> bool:
        assert op.element is not None
        container = self._container(sm, op.path)
        members = self._members(container)
        if isinstance(container, model.SubmodelElementList):
            try:
                members.add(op.element)
            except (model.AASConstraintViolation, ValueError, TypeError) as exc:
                raise StoreError(400, f"element does not fit the list: {exc}") from None
            return True
        if op.element.id_short is None:
            raise StoreError(400, "the new element needs an idShort")
        if _find(container, op.element.id_short) is not None:
            raise StoreError(
                409, f"an element {op.element.id_short!r} already exists at {op.path or 'the submodel root'}"
            )
        try:
            members.add(op.element)
        except (model.AASConstraintViolation, KeyError, ValueError) as exc:
            raise StoreError(409, str(exc)) from None
        return True

    def _split(self, path: str | None) -> tuple[str | None, str]:
        if not path:
            raise StoreError(400, "an idShortPath is required")
        parts = model.Referable.parse_id_short_path(path)
        parent = model.Referable.build_id_short_path(parts[:-1]) if len(parts) > 1 else None
        return parent, parts[-1]

    def _apply_put(self, sm: model.Submodel, op: WriteRequest) -> bool:
        assert op.element is not None
        parent_path, leaf = self._split(op.path)
        container = self._container(sm, parent_path)
        members = self._members(container)
        if isinstance(container, model.SubmodelElementList):
            if not leaf.isdigit():
                raise StoreError(400, "elements of a list are addressed by index")
            index = int(leaf)
            if index >= len(members):
                raise StoreError(404, f"no element at index {index}")
            old = members[index]
            try:
                members.remove(old)
                members.insert(index, op.element)
            except (model.AASConstraintViolation, ValueError, TypeError) as exc:
                members.insert(index, old)
                raise StoreError(400, f"element does not fit the list: {exc}") from None
            return False
        if op.element.id_short != leaf:
            raise StoreError(
                400, f"idShort {op.element.id_short!r} of the body does not match the path ({leaf!r})"
            )
        existing = _find(container, leaf)
        if existing is None:
            members.add(op.element)
            return True
        _replace_in_place(members, existing, op.element)
        return False

    def _apply_patch(self, sm: model.Submodel, op: WriteRequest) -> None:
        assert op.element is not None
        current = self.resolve(sm.id, op.path)
        if isinstance(current, model.Submodel):
            raise StoreError(400, "PATCH needs an element path")
        if type(current) is not type(op.element):
            raise StoreError(
                400, f"cannot patch a {type(current).__name__} with a {type(op.element).__name__}"
            )
        if op.element.id_short != current.id_short and not isinstance(
            current.parent, model.SubmodelElementList
        ):
            raise StoreError(400, "the idShort of a PATCH body must match the element")
        merged = _merge(json.loads(_encode(current)), json.loads(_encode(op.element)))
        try:
            replacement = from_json(merged, model.SubmodelElement)  # type: ignore[type-abstract]
        except ValueError as exc:
            raise StoreError(400, f"patched element is invalid: {exc}") from None
        self._apply_put(sm, WriteRequest(WriteKind.PUT, op.submodel_id, op.path, replacement, op.owner))

    def _apply_delete(self, sm: model.Submodel, op: WriteRequest) -> None:
        target = self.resolve(sm.id, op.path)
        if isinstance(target, model.Submodel):
            raise StoreError(400, "DELETE needs an element path")
        parent_path, _ = self._split(op.path)
        members = self._members(self._container(sm, parent_path))
        members.remove(target)

    # -- operations -----------------------------------------------------------------------------------------------

    def register_operation(self, submodel_id: str, path: str, handler: OperationHandler) -> None:
        """Make the Operation at ``path`` invokable over HTTP (``POST .../{path}/invoke``)."""
        self._operations[(submodel_id, path)] = handler

    def operation_handler(self, submodel_id: str, path: str) -> OperationHandler | None:
        return self._operations.get((submodel_id, path))

    # -- helpers for servers --------------------------------------------------------------------------------------

    def value_only(self, submodel_id: str, path: str | None) -> Any:
        target = self.resolve(submodel_id, path)
        data = json.loads(_encode(target))
        if isinstance(target, model.Submodel):
            from .valueonly import submodel_value_only

            return submodel_value_only(data)
        return element_value_only(data)


def _top(path: str) -> str:
    """First idShort of an idShortPath (``Step001.Bids[2].Price`` -> ``Step001``)."""
    return path.split(".", 1)[0].split("[", 1)[0]


def _encode_submodel(
    sm: model.Submodel, parts: dict[str, tuple[object, bytes]], pending: dict[str, dict[str, Any]]
) -> bytes:
    """The submodel's JSON, re-serialising only top-level elements without an up-to-date cached fragment.

    ``pending`` elements (AAS JSON not yet built as objects) replace their namesakes in place or
    come last, in the order they were put — where :meth:`AasStore._materialize` will put them.
    """
    encoder = FastAASToJsonEncoder(ensure_ascii=False, separators=(",", ":"))
    envelope = encoder.default(sm)
    envelope.pop("submodelElements", None)  # type: ignore[union-attr]
    head = encoder.encode(envelope).encode("utf-8")
    fragments = []
    seen = set()

    def fragment(key: str, source: object) -> bytes:
        cached = parts.get(key)
        if cached is None or cached[0] is not source:
            body = (
                orjson.dumps(source) if isinstance(source, dict) else encoder.encode(source).encode("utf-8")
            )
            cached = parts[key] = (source, body)
        return cached[1]

    for element in sm.submodel_element:
        key = element.id_short or ""
        seen.add(key)
        fragments.append(fragment(key, pending.get(key, element)))
    for key, data in pending.items():
        if key not in seen:
            seen.add(key)
            fragments.append(fragment(key, data))
    for key in [k for k in parts if k not in seen]:
        del parts[key]
    if not fragments:
        return head
    return head[:-1] + b',"submodelElements":[' + b",".join(fragments) + b"]}"


def _replace_in_place(members: Any, existing: model.SubmodelElement, element: model.SubmodelElement) -> None:
    """Put ``element`` where ``existing`` is: clients rely on the order they see, and basyx's
    namespace sets can only append, so the elements after it are taken out and put back."""
    tail = list(members)
    tail = tail[tail.index(existing) :]
    for el in tail:
        members.remove(el)
    members.add(element)
    for el in tail[1:]:
        members.add(el)


def _find(container: Any, id_short: str) -> model.SubmodelElement | None:
    try:
        return container.get_referable(id_short)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError):
        return None


def _merge(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge a PATCH body into the current JSON: fields replace, child lists of collections merge by idShort."""
    out = dict(current)
    for key, value in patch.items():
        if (
            key in ("value", "statements", "annotations")
            and isinstance(value, list)
            and isinstance(out.get(key), list)
            and current.get("modelType") != "SubmodelElementList"
            and all(isinstance(v, dict) and "idShort" in v for v in [*value, *out[key]])
        ):
            by_id = {c["idShort"]: c for c in out[key]}
            order = [c["idShort"] for c in out[key]]
            for item in value:
                if item["idShort"] in by_id:
                    by_id[item["idShort"]] = _merge(by_id[item["idShort"]], item)
                else:
                    by_id[item["idShort"]] = item
                    order.append(item["idShort"])
            out[key] = [by_id[i] for i in order]
        else:
            out[key] = value
    return out


def parse_operation_arguments(raw: Any, what: str) -> list[model.SubmodelElement]:
    """Parse ``[{"value": <SubmodelElement>}, ...]`` (OperationVariable JSON) into elements."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise StoreError(400, f"{what} must be an array of OperationVariables")
    out: list[model.SubmodelElement] = []
    for i, var in enumerate(raw):
        if not isinstance(var, dict) or not isinstance(var.get("value"), dict):
            raise StoreError(400, f"{what}[{i}] must be an object with a 'value' submodel element")
        try:
            out.append(from_json(var["value"], model.SubmodelElement))  # type: ignore[type-abstract]
        except ValueError as exc:
            raise StoreError(400, f"{what}[{i}]: {exc}") from None
    return out


def operation_variables_json(elements: Sequence[model.SubmodelElement]) -> list[dict[str, Any]]:
    return [{"value": json.loads(_encode(e))} for e in elements]
