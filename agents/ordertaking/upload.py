"""Reading a vendor's upload safely: content types, multipart, AASX package checks, AAS JSON, content rules.

Order of checks (each failure is a :class:`~agents.ordertaking.errors.Rejection` with a clear message):

1. **Content type** — AAS JSON (``application/json``), an AASX package
   (``application/asset-administration-shell-package+xml``), or ``multipart/form-data`` with the file in a
   part named ``file``; anything else is 415.
2. **Size** — the body (and the file part) against ``max_json_bytes`` / ``max_aasx_bytes``: 413.
3. **AASX package safety, before basyx opens it** — a ZIP at all; at most ``max_entries`` entries; no entry
   name that is absolute, contains ``..``, a backslash, a drive letter or a control character (path
   traversal); no encrypted entries or compression methods other than stored/deflate; no duplicate names;
   the declared uncompressed total within ``max_uncompressed_bytes`` (413) and no entry or package with a
   compression ratio above ``max_ratio`` (zip bomb, 422); then every entry is actually decompressed, in
   chunks, counting bytes (a lying header cannot get past the limits; a bad CRC is caught); XML parts with a
   ``<!DOCTYPE`` or ``<!ENTITY`` (entity expansion) are refused; XML of metamodel V3.0 (or older) is refused
   with a message saying how to convert it — basyx 2.x reads only V3.1 and would return an empty package.
4. **basyx reads it strictly** — anything basyx had to skip is reported; a package or document that reads
   back without a shell is refused (:class:`agents.aas.io.EmptyPackageError`).
5. **Content rules** — exactly one shell, of an asset *instance*, with a ``globalAssetId``; no identifier under
   twinbid's own id space (``https://twinbid.dev/ids/``).
"""

from __future__ import annotations

import email.message
import email.utils
import io as _io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field

from basyx.aas import model
from basyx.aas.adapter import aasx

from agents.aas.ids import ID_BASE
from agents.aas.io import AasReadError, EmptyPackageError, ReadResult, read_aasx, read_json

from .errors import Problem, Rejection

__all__ = [
    "AASX_TYPES",
    "JSON_TYPES",
    "MULTIPART_TYPE",
    "Upload",
    "UploadLimits",
    "VendorAas",
    "check_aasx",
    "check_content",
    "media_type",
    "parse_multipart",
    "read_upload",
]

JSON_TYPES = ("application/json",)
AASX_TYPES = (
    "application/asset-administration-shell-package+xml",
    "application/asset-administration-shell-package",
)
MULTIPART_TYPE = "multipart/form-data"
ACCEPTED = (*JSON_TYPES, *AASX_TYPES, MULTIPART_TYPE)


@dataclass(frozen=True)
class UploadLimits:
    max_json_bytes: int = 4 * 1024 * 1024
    max_aasx_bytes: int = 16 * 1024 * 1024
    max_uncompressed_bytes: int = 64 * 1024 * 1024
    max_entries: int = 512
    max_ratio: float = 100.0
    #: entries (and packages) smaller than this uncompressed are not ratio-checked (tiny XML compresses well)
    ratio_floor_bytes: int = 1024 * 1024
    max_form_fields: int = 16
    max_field_bytes: int = 64 * 1024

    @property
    def max_body_bytes(self) -> int:
        """What the HTTP layer lets in: the largest upload, base64-encoded (operation Blob), plus slack."""
        return max(self.max_json_bytes, self.max_aasx_bytes * 4 // 3) + 256 * 1024


@dataclass
class Upload:
    """The file part of a request: bytes and what kind of document they claim to be."""

    data: bytes
    kind: str  # "json" | "aasx"
    fields: dict[str, str] = field(default_factory=dict)  # other multipart form fields


@dataclass
class VendorAas:
    """What basyx read from the upload and the content checks accepted."""

    shell: model.AssetAdministrationShell
    submodels: list[model.Submodel]
    files: aasx.DictSupplementaryFileContainer | None
    warnings: list[str]


# ---------------------------------------------------------------------------------------------------------------------
# content type and multipart
# ---------------------------------------------------------------------------------------------------------------------


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """``"Multipart/Form-Data; boundary=x"`` -> ``("multipart/form-data", {"boundary": "x"})``."""
    if not content_type:
        return "", {}
    msg = email.message.Message()
    msg["content-type"] = content_type
    params = {str(k).lower(): str(v) for k, v in (msg.get_params() or [])[1:]}
    return content_type.split(";", 1)[0].strip().lower(), params


def kind_of(content_type: str) -> str | None:
    mt, _ = media_type(content_type)
    if mt in JSON_TYPES or (mt.startswith("application/") and mt.endswith("+json")):
        return "json"
    if mt in AASX_TYPES:
        return "aasx"
    return None


def unsupported_type(got: str) -> Rejection:
    return Rejection(
        415,
        Problem(
            "Content-Type",
            f"{got or 'none'} is not accepted; send the AAS as {JSON_TYPES[0]} (an AAS V3.1 environment), as "
            f"{AASX_TYPES[0]} (an AASX package), or as {MULTIPART_TYPE} with the file in a part named 'file'",
        ),
    )


@dataclass
class _Part:
    headers: dict[str, str]
    content: bytes

    def param(self, name: str) -> str | None:
        msg = email.message.Message()
        msg["content-disposition"] = self.headers.get("content-disposition", "")
        value = msg.get_param(name, header="content-disposition")
        if isinstance(value, tuple):  # RFC 2231 encoded
            value = email.utils.collapse_rfc2231_value(value)
        return value if isinstance(value, str) else None


def parse_multipart(body: bytes, content_type: str, limits: UploadLimits) -> Upload:
    """The ``file`` part (or the only part with a filename) and the text fields of a multipart/form-data body."""
    _, params = media_type(content_type)
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise Rejection(
            400, Problem("Content-Type", "multipart/form-data without a valid boundary parameter")
        )
    delim = b"--" + boundary.encode("latin-1")
    start = body.find(delim)
    if start < 0:
        raise Rejection(400, Problem("body", "multipart body does not contain its boundary"))
    pos = start + len(delim)
    parts: list[_Part] = []
    while True:
        if body[pos : pos + 2] == b"--":
            break
        if body[pos : pos + 2] != b"\r\n":
            raise Rejection(400, Problem("body", "malformed multipart body (boundary not followed by CRLF)"))
        pos += 2
        end = body.find(b"\r\n" + delim, pos)
        if end < 0:
            raise Rejection(400, Problem("body", "multipart body is truncated (no closing boundary)"))
        head, sep, content = body[pos:end].partition(b"\r\n\r\n")
        if not sep:
            raise Rejection(
                400, Problem("body", "malformed multipart part (no blank line after its headers)")
            )
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append(_Part(headers, content))
        if len(parts) > limits.max_form_fields:
            raise Rejection(400, Problem("body", f"more than {limits.max_form_fields} multipart parts"))
        pos = end + 2 + len(delim)
    files = [p for p in parts if p.param("filename") is not None or p.param("name") == "file"]
    chosen = next((p for p in files if p.param("name") == "file"), files[0] if len(files) == 1 else None)
    if chosen is None:
        raise Rejection(
            422,
            Problem("file", "missing: put the AAS (AASX package or AAS JSON) in a form part named 'file'"),
        )
    fields: dict[str, str] = {}
    for p in parts:
        if p is chosen:
            continue
        name = p.param("name")
        if not name:
            continue
        if len(p.content) > limits.max_field_bytes:
            raise Rejection(413, Problem(name, f"form field larger than {limits.max_field_bytes} bytes"))
        try:
            fields[name] = p.content.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejection(422, Problem(name, "form field is not UTF-8 text")) from None
    kind = kind_of(chosen.headers.get("content-type", ""))
    if kind is None:
        filename = (chosen.param("filename") or "").lower()
        if filename.endswith(".aasx"):
            kind = "aasx"
        elif filename.endswith(".json"):
            kind = "json"
        elif chosen.content[:4] == b"PK\x03\x04":
            kind = "aasx"
        elif chosen.content.lstrip()[:1] == b"{":
            kind = "json"
        else:
            raise unsupported_type(chosen.headers.get("content-type", "") or "an unknown file type")
    return Upload(chosen.content, kind, fields)


# ---------------------------------------------------------------------------------------------------------------------
# AASX safety
# ---------------------------------------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")
_NS = re.compile(rb"https?://(?:www\.)?admin-shell\.io/aas/(\d+)/(\d+)")
_DANGEROUS_XML = (b"<!DOCTYPE", b"<!ENTITY")
_CHUNK = 64 * 1024


def _bad_name(name: str) -> str | None:
    if not name:
        return "an empty entry name"
    if any(ord(c) < 32 for c in name):
        return "a control character in an entry name"
    if "\\" in name:
        return "a backslash in an entry name"
    if name.startswith("/") or _DRIVE.match(name):
        return "an absolute entry name"
    if any(seg == ".." for seg in name.split("/")):
        return "an entry name with '..' (path traversal)"
    if len(name) > 1024:
        return "an entry name longer than 1024 characters"
    return None


def check_aasx(data: bytes, limits: UploadLimits) -> None:
    """Refuse a package that is not a safe ZIP before basyx touches it (see the module docstring)."""
    field_name = "aasx"
    if len(data) > limits.max_aasx_bytes:
        raise Rejection(
            413,
            Problem(field_name, f"the package is {len(data)} bytes; the limit is {limits.max_aasx_bytes}"),
        )
    if data[:4] != b"PK\x03\x04":
        raise Rejection(422, Problem(field_name, "not an AASX package: the body is not a ZIP archive"))
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise Rejection(422, Problem(field_name, f"not a readable ZIP archive: {exc}")) from None
    if len(infos) > limits.max_entries:
        raise Rejection(
            422, Problem(field_name, f"{len(infos)} entries; at most {limits.max_entries} are accepted")
        )
    seen: set[str] = set()
    declared = 0
    for info in infos:
        name = info.filename
        why = _bad_name(name) or _bad_name(info.orig_filename if info.orig_filename != name else name)
        if why:
            raise Rejection(422, Problem(field_name, f"refused: {why}: {name[:200]!r}"))
        if name.lower() in seen:
            raise Rejection(422, Problem(field_name, f"refused: entry {name[:200]!r} appears twice"))
        seen.add(name.lower())
        if info.flag_bits & 0x1:
            raise Rejection(422, Problem(field_name, f"refused: entry {name[:200]!r} is encrypted"))
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Rejection(
                422,
                Problem(
                    field_name,
                    f"refused: entry {name[:200]!r} uses compression method {info.compress_type} (only stored and deflate)",
                ),
            )
        declared += info.file_size
        if declared > limits.max_uncompressed_bytes:
            raise Rejection(
                413,
                Problem(
                    field_name,
                    f"refused: the package unpacks to more than {limits.max_uncompressed_bytes} bytes (zip bomb?)",
                ),
            )
        if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            ratio = info.file_size / max(info.compress_size, 1)
            raise Rejection(
                422,
                Problem(
                    field_name,
                    f"refused: entry {name[:200]!r} has a compression ratio of {ratio:,.0f}:1, above {limits.max_ratio:g}:1 (zip bomb?)",
                ),
            )
    if declared > limits.ratio_floor_bytes and declared > limits.max_ratio * len(data):
        raise Rejection(
            422,
            Problem(
                field_name,
                f"refused: the package unpacks {declared / len(data):,.0f} times its size, above {limits.max_ratio:g} (zip bomb?)",
            ),
        )
    versions: set[str] = set()
    total = 0
    for info in infos:
        if info.is_dir():
            continue
        xml = info.filename.lower().endswith((".xml", ".rels"))
        got = 0
        head = b""
        tail = b""
        try:
            with zf.open(info) as fh:
                while chunk := fh.read(_CHUNK):
                    got += len(chunk)
                    total += len(chunk)
                    if got > info.file_size or total > limits.max_uncompressed_bytes:
                        raise Rejection(
                            413,
                            Problem(
                                field_name,
                                f"refused: entry {info.filename[:200]!r} unpacks to more than its header says (zip bomb?)",
                            ),
                        )
                    if xml:
                        window = tail + chunk
                        upper = window.upper()
                        if any(marker in upper for marker in _DANGEROUS_XML):
                            raise Rejection(
                                422,
                                Problem(
                                    field_name,
                                    f"refused: XML part {info.filename[:200]!r} has a DOCTYPE/ENTITY declaration (not allowed in AASX)",
                                ),
                            )
                        tail = window[-16:]
                        if len(head) < 8192:
                            head += chunk[: 8192 - len(head)]
        except zipfile.BadZipFile as exc:
            raise Rejection(
                422, Problem(field_name, f"corrupt entry {info.filename[:200]!r}: {exc}")
            ) from None
        except (zipfile.LargeZipFile, ValueError, EOFError, OSError, NotImplementedError, zlib.error) as exc:
            raise Rejection(
                422, Problem(field_name, f"unreadable entry {info.filename[:200]!r}: {exc}")
            ) from None
        if xml:
            versions.update(f"{m.group(1).decode()}.{m.group(2).decode()}" for m in _NS.finditer(head))
    old = sorted(v for v in versions if v != "3.1")
    if old and "3.1" not in versions:
        raise Rejection(
            422,
            Problem(
                field_name,
                f"the package's XML uses AAS metamodel V{old[0]} (namespace https://admin-shell.io/aas/"
                f"{old[0].replace('.', '/')}); this service reads V3.1 only — convert the package to V3.1 (e.g. "
                "with the AASX Package Explorer or aas-core's converters) or submit the AAS as V3.1 JSON",
            ),
        )


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(data: bytes, limits: UploadLimits) -> ReadResult:
    if len(data) > limits.max_json_bytes:
        raise Rejection(
            413, Problem("body", f"the AAS JSON is {len(data)} bytes; the limit is {limits.max_json_bytes}")
        )
    try:
        doc = json.loads(data)
    except RecursionError:
        raise Rejection(422, Problem("body", "the JSON is nested too deeply")) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejection(422, Problem("body", f"not valid JSON: {exc}")) from None
    if isinstance(doc, dict) and doc.get("modelType") == "AssetAdministrationShell":
        raise Rejection(
            422,
            Problem(
                "body",
                'this is a single shell; send an AAS environment {"assetAdministrationShells": [...], "submodels": [...]}',
            ),
        )
    if not isinstance(doc, dict) or "assetAdministrationShells" not in doc:
        raise Rejection(
            422,
            Problem(
                "body",
                "not an AAS: expected an AAS V3.1 environment, a JSON object with 'assetAdministrationShells' "
                "(and 'submodels')",
            ),
        )
    try:
        result = read_json(data, require_shell=False)
    except EmptyPackageError as exc:
        raise Rejection(422, Problem("assetAdministrationShells", str(exc))) from None
    except AasReadError as exc:
        raise Rejection(422, Problem("body", f"not a valid AAS V3.1 environment: {exc}")) from None
    except RecursionError:
        raise Rejection(422, Problem("body", "the JSON is nested too deeply")) from None
    return _strict(result, "body", "not a valid AAS V3.1 environment")


def _strict(result: ReadResult, field_name: str, what: str) -> ReadResult:
    """Refuse what basyx could only read in part (its warnings name the defects), or without a shell."""
    if result.warnings:
        raise Rejection(422, Problem(field_name, f"{what}: " + "; ".join(result.warnings[:5])))
    if not result.shells:
        raise Rejection(
            422,
            Problem(
                "assetAdministrationShells",
                "contains no Asset Administration Shell; submit the product instance's shell",
            ),
        )
    return result


def _read_aasx(data: bytes, limits: UploadLimits) -> ReadResult:
    check_aasx(data, limits)
    try:
        result = read_aasx(data, require_shell=False)
    except EmptyPackageError as exc:
        raise Rejection(422, Problem("aasx", f"{exc}; nothing to manufacture")) from None
    except AasReadError as exc:
        raise Rejection(422, Problem("aasx", str(exc))) from None
    except RecursionError:
        raise Rejection(422, Problem("aasx", "the package's content is nested too deeply")) from None
    except Exception as exc:
        # Found by the fuzz suite: basyx lets the errors of hostile packages through (lxml's
        # XMLSyntaxError for a damaged XML part, zlib.error for a damaged deflate stream, ...),
        # which came out as 500s. Whatever the reader could not read is the package's fault.
        raise Rejection(
            422, Problem("aasx", f"the package could not be read: {type(exc).__name__}: {exc}"[:500])
        ) from None
    return _strict(result, "aasx", "the package is not valid AAS V3.1")


def read_upload(upload: Upload, limits: UploadLimits) -> VendorAas:
    """Check and read an upload (CPU-bound: call it in a worker thread); :class:`Rejection` when refused."""
    result = _read_json(upload.data, limits) if upload.kind == "json" else _read_aasx(upload.data, limits)
    shell, submodels = check_content(result)
    return VendorAas(shell, submodels, result.files if upload.kind == "aasx" else None, result.warnings)


def check_content(result: ReadResult) -> tuple[model.AssetAdministrationShell, list[model.Submodel]]:
    """The content rules for a product instance's AAS (exactly one shell of an instance, asset id, ids)."""
    problems: list[Problem] = []
    shells = result.shells
    if len(shells) != 1:
        raise Rejection(
            422,
            Problem(
                "assetAdministrationShells",
                f"holds {len(shells)} shells; submit one product instance (one shell) per order",
            ),
        )
    shell = shells[0]
    where = "assetAdministrationShells[0].assetInformation"
    info = shell.asset_information
    if not info.global_asset_id:
        problems.append(
            Problem(
                f"{where}.globalAssetId", "missing: the product instance needs its globally unique asset id"
            )
        )
    if info.asset_kind is not model.AssetKind.INSTANCE:
        problems.append(
            Problem(
                f"{where}.assetKind",
                f"is {info.asset_kind.name.title()}; a product to manufacture is an Instance",
            )
        )
    for obj in result.objects:
        if isinstance(obj, model.Identifiable) and obj.id.startswith(ID_BASE + "/"):
            problems.append(
                Problem(f"{type(obj).__name__}.id", f"{obj.id!r} is in twinbid's own id space ({ID_BASE}/)")
            )
    if problems:
        raise Rejection(422, problems)
    return shell, result.submodels
