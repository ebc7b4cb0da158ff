"""Reading and writing AAS content with basyx: single objects as JSON, environments as JSON, AASX packages.

Why the care on reading: basyx 2.2 reads only metamodel V3.1 XML. An AASX whose XML part is V3.0
(namespace ``https://admin-shell.io/aas/3/0``) comes back, under the default ``failsafe=True``, as an
*empty* store with an error in the log. A vendor upload that reads back empty must be rejected, so
:func:`read_aasx` raises :class:`EmptyPackageError` with the reason, and every error basyx logs while
reading is collected and returned (or raised with ``strict=True``) instead of vanishing into the log.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, TypeVar

from basyx.aas import model
from basyx.aas.adapter import aasx
from basyx.aas.adapter.json import AASToJsonEncoder, StrictAASFromJsonDecoder, read_aas_json_file
from basyx.aas.adapter.json.json_serialization import object_store_to_json

T = TypeVar("T")
PathOrIO = str | os.PathLike[str] | IO[bytes]


class AasReadError(ValueError):
    """The content could not be read as AAS V3.1 (the message says why)."""


class EmptyPackageError(AasReadError):
    """The package or document read back without any AAS object (e.g. V3.0 XML read by basyx 2.x)."""


# ---------------------------------------------------------------------------------------------------------------------
# single objects
# ---------------------------------------------------------------------------------------------------------------------


class FastAASToJsonEncoder(AASToJsonEncoder):
    """basyx's encoder with its type dispatch cached per concrete class — same output, ~2x faster.

    basyx's ``default()`` rebuilds its class->serialiser table and walks it with ``isinstance`` (ABC checks)
    for every object; for a 1,000-element submodel that is most of the serialisation time. The first match
    in basyx's own order is cached per ``type(obj)``, so the chosen serialiser is the one basyx would pick.
    """

    _dispatch: ClassVar[dict[type, Any]] = {}

    def default(self, obj: object) -> object:
        method = self._dispatch.get(type(obj))
        if method is None:
            for typ, candidate in self._get_aas_class_serializers().items():
                if isinstance(obj, typ):
                    method = candidate
                    break
            else:
                return super().default(obj)
            self._dispatch[type(obj)] = method
        return method(obj)


def to_json(obj: object, **kwargs: Any) -> str:
    """Official JSON of one basyx object (a shell, submodel, element, reference ...)."""
    return json.dumps(obj, cls=FastAASToJsonEncoder, **kwargs)


def to_jsonable(obj: object) -> Any:
    """JSON-compatible Python data for one basyx object (round-trips through :func:`to_json`)."""
    return json.loads(to_json(obj))


def from_json(data: str | bytes | dict[str, Any], expected: type[T] = object) -> T:  # type: ignore[assignment]
    """Parse one object with basyx's *strict* decoder; anything malformed raises :class:`AasReadError`.

    ``expected`` (e.g. ``model.SubmodelElement``) also rejects a well-formed object of another kind.
    """
    text = json.dumps(data) if isinstance(data, dict) else data
    try:
        obj = json.loads(text, cls=StrictAASFromJsonDecoder)
    except (ValueError, KeyError, TypeError, model.AASConstraintViolation) as exc:
        raise AasReadError(_short(exc)) from None
    if not isinstance(obj, expected):
        what = obj.get("modelType") if isinstance(obj, dict) else type(obj).__name__
        raise AasReadError(f"expected a {expected.__name__}, got {what or 'an object without modelType'}")
    return obj


def element_from_json(data: str | bytes | dict[str, Any]) -> model.SubmodelElement:
    return from_json(data, model.SubmodelElement)  # type: ignore[type-abstract]


def submodel_from_json(data: str | bytes | dict[str, Any]) -> model.Submodel:
    return from_json(data, model.Submodel)


def shell_from_json(data: str | bytes | dict[str, Any]) -> model.AssetAdministrationShell:
    return from_json(data, model.AssetAdministrationShell)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).split(" >>> ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# environments (JSON files)
# ---------------------------------------------------------------------------------------------------------------------


def _store(objects: Iterable[model.Identifiable]) -> model.DictIdentifiableStore[model.Identifiable]:
    if isinstance(objects, model.DictIdentifiableStore):
        return objects
    return model.DictIdentifiableStore(list(objects))


def environment_json(objects: Iterable[model.Identifiable]) -> str:
    """``{"assetAdministrationShells": [...], "submodels": [...], ...}`` for the given identifiables."""
    return object_store_to_json(_store(objects), encoder=FastAASToJsonEncoder)


def write_json(file: PathOrIO, objects: Iterable[model.Identifiable]) -> None:
    text = environment_json(objects).encode("utf-8")
    if isinstance(file, str | os.PathLike):
        with open(file, "wb") as fh:
            fh.write(text)
    else:
        file.write(text)


@contextlib.contextmanager
def _capture_basyx_errors() -> Iterator[list[str]]:
    """Collect what basyx logs at WARNING and above while reading (its failsafe mode only logs)."""
    records: list[str] = []

    class _Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(_short(Exception(record.getMessage())))

    handler = _Collector(level=logging.WARNING)
    logger = logging.getLogger("basyx")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@dataclass
class ReadResult:
    """Objects read, supplementary files (AASX only), and the problems basyx reported while reading."""

    objects: model.DictIdentifiableStore[model.Identifiable]
    files: aasx.DictSupplementaryFileContainer = field(default_factory=aasx.DictSupplementaryFileContainer)
    warnings: list[str] = field(default_factory=list)

    @property
    def shells(self) -> list[model.AssetAdministrationShell]:
        return [o for o in self.objects if isinstance(o, model.AssetAdministrationShell)]

    @property
    def submodels(self) -> list[model.Submodel]:
        return [o for o in self.objects if isinstance(o, model.Submodel)]


def _as_binary(file: PathOrIO | bytes) -> PathOrIO:
    return _io.BytesIO(file) if isinstance(file, bytes | bytearray) else file


def read_json(file: PathOrIO | bytes, *, strict: bool = False, require_shell: bool = False) -> ReadResult:
    """Read a JSON environment. Empty results raise :class:`EmptyPackageError`; ``strict`` raises on any
    object basyx had to skip."""
    src = _as_binary(file)
    with _capture_basyx_errors() as problems:
        try:
            if isinstance(src, str | os.PathLike):
                store = read_aas_json_file(src, failsafe=True)
            else:
                store = read_aas_json_file(_io.TextIOWrapper(src, encoding="utf-8-sig"), failsafe=True)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AasReadError(f"not an AAS JSON environment: {_short(exc)}") from None
    return _check(
        ReadResult(store, warnings=problems), strict=strict, require_shell=require_shell, what="JSON"
    )


def _check(result: ReadResult, *, strict: bool, require_shell: bool, what: str, hint: str = "") -> ReadResult:
    if len(result.objects) == 0:
        details = "; ".join(result.warnings[:3])
        raise EmptyPackageError(
            f"the {what} contains no AAS objects readable as metamodel V3.1{hint}"
            + (f" (basyx reported: {details})" if details else "")
        )
    if require_shell and not result.shells:
        raise EmptyPackageError(f"the {what} contains no Asset Administration Shell")
    if strict and result.warnings:
        raise AasReadError(f"the {what} has defects basyx skipped: " + "; ".join(result.warnings[:5]))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# AASX packages
# ---------------------------------------------------------------------------------------------------------------------

_NS = re.compile(rb"https?://(?:www\.)?admin-shell\.io/aas/(\d+)/(\d+)")


def _sniff_versions(file: PathOrIO) -> set[str]:
    """Metamodel namespaces mentioned by the package's XML parts (for a helpful error message)."""
    found: set[str] = set()
    try:
        pos = file.tell() if hasattr(file, "tell") else None
        with zipfile.ZipFile(file) as zf:  # type: ignore[arg-type]
            for name in zf.namelist():
                if (
                    name.endswith(".xml")
                    and not name.startswith(("[Content_Types]", "_rels/"))
                    and "/_rels/" not in name
                ):
                    with zf.open(name) as fh:
                        head = fh.read(4096)
                    found.update(f"{m.group(1).decode()}.{m.group(2).decode()}" for m in _NS.finditer(head))
        if pos is not None:
            file.seek(pos)  # type: ignore[union-attr]
    except (zipfile.BadZipFile, OSError, ValueError):
        pass
    return found


def read_aasx(file: PathOrIO | bytes, *, strict: bool = False, require_shell: bool = True) -> ReadResult:
    """Read an AASX package; reject it (:class:`EmptyPackageError`) when nothing usable comes back.

    ``require_shell`` (default) also rejects a package without any shell — what a vendor upload must have.
    """
    src = _as_binary(file)
    with _capture_basyx_errors() as problems:
        try:
            with aasx.AASXReader(src, failsafe=True) as reader:
                store: model.DictIdentifiableStore[model.Identifiable] = model.DictIdentifiableStore()
                files = aasx.DictSupplementaryFileContainer()
                reader.read_into(store, files)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            raise AasReadError(f"not a readable AASX package: {_short(exc)}") from None
    hint = ""
    if len(store) == 0:
        if not isinstance(src, str | os.PathLike) and hasattr(src, "seek"):
            src.seek(0)
        versions = _sniff_versions(src)
        if versions and "3.1" not in versions:
            hint = (
                f"; its XML uses metamodel {', '.join(sorted(versions))} (namespace https://admin-shell.io/aas/"
                f"{sorted(versions)[0].replace('.', '/')}), but basyx 2.x reads only V3.1 — convert the package "
                "to V3.1 (e.g. with the AASX Package Explorer) or upload it as V3.1 JSON"
            )
    return _check(
        ReadResult(store, files, problems),
        strict=strict,
        require_shell=require_shell,
        what="AASX package",
        hint=hint,
    )


def write_aasx(
    file: PathOrIO,
    objects: Iterable[model.Identifiable],
    *,
    aas_ids: Iterable[str] | None = None,
    write_json: bool = False,
    files: aasx.AbstractSupplementaryFileContainer | None = None,
) -> None:
    """Write shells (with the submodels they reference) to an AASX package (XML V3.1 unless ``write_json``)."""
    store = _store(objects)
    ids = (
        list(aas_ids)
        if aas_ids is not None
        else [o.id for o in store if isinstance(o, model.AssetAdministrationShell)]
    )
    if not ids:
        raise ValueError("an AASX package needs at least one Asset Administration Shell")
    with aasx.AASXWriter(file) as writer:
        writer.write_aas(ids, store, files or aasx.DictSupplementaryFileContainer(), write_json=write_json)


def aasx_bytes(objects: Iterable[model.Identifiable], **kwargs: Any) -> bytes:
    buf = _io.BytesIO()
    write_aasx(buf, objects, **kwargs)
    return buf.getvalue()
