"""Reading and writing scenario files, with error messages a user can act on.

Every problem with a file is reported as one line ``<file>: <field.path>: <what is wrong>``
(plus `` (line N)`` where the YAML position is known); YAML syntax errors as
``<file>: line L, column C: <what is wrong>``. All problems found are reported together in one
:class:`ScenarioError`; nothing else escapes for bad input, so the CLI can print the message and
exit without a traceback.

Field paths come from pydantic's error locations, translated to the shape of the *file*: list
indices in brackets (``resources[2].capabilities[0].duration``), the tags pydantic inserts for
tagged unions removed, aliases as written (``transport.legs[0].from``).
"""

from __future__ import annotations

import difflib
import json
import re
import types
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from scenarios.schema import UNION_TAGS, CrossFieldErrors, Scenario

__all__ = [
    "MAX_FILE_BYTES",
    "Problem",
    "ScenarioError",
    "dump_scenario",
    "load_scenario",
    "load_scenario_text",
]

#: Scenario files larger than this are refused before parsing.
MAX_FILE_BYTES = 20 * 1024 * 1024
#: Values a document may expand to (aliases count each time they are used): guards against
#: "billion laughs" documents and cyclic aliases.
MAX_VALUES = 2_000_000


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scenario file."""

    source: str
    path: str  # dotted field path; "" when the problem is not about a field (syntax, empty file)
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        if self.path:
            where = f" (line {self.line})" if self.line is not None else ""
            return f"{self.source}: {self.path}: {self.message}{where}"
        if self.line is not None:
            col = f", column {self.column}" if self.column is not None else ""
            return f"{self.source}: line {self.line}{col}: {self.message}"
        return f"{self.source}: {self.message}"


class ScenarioError(Exception):
    """A scenario (or job-shop) file is unusable; ``str()`` lists every problem, one a line."""

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("<scenario>", "", problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- public API


def load_scenario(path: str | PathLike[str]) -> Scenario:
    """Read and validate a scenario file; raises :class:`ScenarioError` listing every problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ScenarioError([Problem(source, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    return _resolve_files(load_scenario_text(raw, source=source), Path(path).parent, source)


def _resolve_files(scenario: Scenario, base: Path, source: str) -> Scenario:
    """Paths in the scenario (TLS certificates) are relative to the file; each must exist."""
    tls = scenario.security.tls
    if tls is None:
        return scenario
    resolved: dict[str, str] = {}
    problems = []
    for name in ("cert", "key", "ca"):
        value = getattr(tls, name)
        if value is None:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base / path)
        if not path.is_file():
            problems.append(Problem(source, f"security.tls.{name}", f"no such file: {str(path)!r}"))
        resolved[name] = str(path.resolve())
    if problems:
        raise ScenarioError(problems)
    security = scenario.security.model_copy(update={"tls": tls.model_copy(update=resolved)})
    return scenario.model_copy(update={"security": security})


def load_scenario_text(text: str | bytes, source: str = "<string>") -> Scenario:
    """Validate a scenario given as YAML text; ``source`` names it in error messages."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise _error(source, f"the file is larger than {MAX_FILE_BYTES} bytes")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _error(source, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if len(text) > MAX_FILE_BYTES:
        raise _error(source, f"the file is larger than {MAX_FILE_BYTES} bytes")

    data, root = _parse_yaml(text, source)
    if data is None:
        raise _error(
            source,
            "the file is empty: a scenario needs at least name, namespace, resources and product_types",
        )
    if not isinstance(data, dict):
        raise ScenarioError(
            [
                Problem(
                    source,
                    "",
                    (
                        "the top level must be a mapping of fields (name:, namespace:, resources:, ...), "
                        f"not {_kind_of(data)}"
                    ),
                    *_line_of(root),
                )
            ]
        )
    problems = _duplicate_keys(root, source)
    if _too_many_values(data):
        problems.append(
            Problem(
                source,
                "",
                f"the document expands to more than {MAX_VALUES} values "
                "(deeply nested or recursive aliases?)",
            )
        )
        raise ScenarioError(problems)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(exc, data, root, source))
    except RecursionError:
        problems.append(Problem(source, "", "the document is nested too deeply"))
    if problems:
        raise ScenarioError(problems)
    return scenario


def dump_scenario(scenario: Scenario, *, header: str | None = None) -> str:
    """The scenario as YAML that :func:`load_scenario_text` reads back to an equal scenario.

    Fields at their default value are left out, so the text shows what is particular to this
    scenario. ``header`` (optional) is written first as ``#`` comment lines.
    """
    data = scenario.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    if header:
        comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        return comments + "\n" + body
    return body


# --------------------------------------------------------------------------- YAML


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster when present


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader (libyaml-backed if available), as a subclass so nothing leaks into it."""


class _Dumper(yaml.SafeDumper):
    """Readable output: integral floats as ints, short lists of scalars inline, text blocks."""


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.Node:
    if value.is_integer() and abs(value) < 1e15:
        return dumper.represent_int(int(value))
    return dumper.represent_float(value)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = (
        0 < len(value) <= 8
        and all(isinstance(v, int | float | bool | str) for v in value)
        and len(json.dumps(value)) <= 72
        and not any(isinstance(v, str) and "\n" in v for v in value)
    )
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow or None)


def _represent_dict(dumper: yaml.SafeDumper, value: dict[Any, Any]) -> yaml.Node:
    flat = all(
        isinstance(v, str | int | float | bool)
        or v is None
        or (isinstance(v, list) and all(isinstance(x, int | float | str) for x in v))
        for v in value.values()
    )
    flow = (
        flat
        and 0 < len(value) <= 6
        and len(json.dumps(value, default=str)) <= 90
        and not any(isinstance(v, str) and "\n" in v for v in value.values())
    )
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow or None)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value.strip("\n") and not value.endswith(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(float, _represent_float)
_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(dict, _represent_dict)


def _parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        what = (
            f"character #x{exc.character:04x} is not allowed in YAML"
            if isinstance(exc.character, int)
            else exc.reason
        )
        raise ScenarioError([Problem(source, "", f"YAML syntax error: {what}", line, column)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = str(exc.problem or "invalid YAML")
        if exc.context:
            what += f" ({exc.context})"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise ScenarioError([Problem(source, "", f"YAML syntax error: {what}", line, col)]) from None
    except yaml.YAMLError as exc:
        raise _error(source, f"YAML error: {exc}") from None
    except RecursionError:
        raise _error(source, "YAML error: the document is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2024-13-45
        raise _error(source, f"YAML value error: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, root


def _duplicate_keys(root: yaml.Node | None, source: str) -> list[Problem]:
    """YAML silently keeps the last of two equal keys; a scenario file should not."""
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.tag == "tag:yaml.org,2002:merge":
                        continue
                    ident = (key.tag, key.value)
                    if ident in first:
                        problems.append(
                            Problem(
                                source,
                                _render_path((*path, key.value)),
                                f"key given twice (first at line {first[ident]})",
                                key.start_mark.line + 1,
                            )
                        )
                    else:
                        first[ident] = key.start_mark.line + 1
                    stack.append((value, (*path, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
    problems.sort(key=lambda p: p.line or 0)
    return problems


def _too_many_values(data: Any) -> bool:
    budget = MAX_VALUES
    stack = [data]
    while stack:
        value = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


# --------------------------------------------------------------------------- validation errors


def _problems_from_validation(
    exc: ValidationError, data: Any, root: yaml.Node | None, source: str
) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if err["type"] == "value_error" and isinstance(ctx_error, CrossFieldErrors):
            for loc, message in ctx_error.problems:
                problems.append(_problem(source, (*err["loc"], *loc), message, data, root))
        else:
            problems.append(_problem(source, tuple(err["loc"]), _message(err), data, root))
    return problems


def _problem(source: str, loc: tuple[Any, ...], message: str, data: Any, root: yaml.Node | None) -> Problem:
    kept, node, is_key = _resolve(loc, data, root)
    if is_key:
        message = f"key {json.dumps(kept[-1]) if kept else ''}: {message}"
    line = node.start_mark.line + 1 if node is not None else None
    return Problem(source, _render_path(kept), message, line)


_MISSING = object()


def _resolve(
    loc: tuple[Any, ...], data: Any, root: yaml.Node | None
) -> tuple[list[Any], yaml.Node | None, bool]:
    """Map a pydantic location onto the document: the path as written, the deepest YAML node
    reached (for its line) and whether the error is about a mapping key."""
    kept: list[Any] = []
    cur, node, is_key = data, root, False
    for elem in loc:
        if elem == "[key]":
            is_key = True
            continue
        if isinstance(cur, dict) and _hashable(elem) and elem in cur:
            kept.append(elem)
            cur, node = cur[elem], _child(node, elem)
        elif isinstance(cur, list) and isinstance(elem, int) and 0 <= elem < len(cur):
            kept.append(elem)
            cur, node = cur[elem], _child(node, elem)
        elif isinstance(elem, str) and elem in UNION_TAGS and cur is not _MISSING:
            continue  # tag pydantic inserted for a tagged union: not part of the file
        else:
            kept.append(elem)
            cur = _MISSING
    return kept, node, is_key


def _hashable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _child(node: yaml.Node | None, elem: Any) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(elem):
                return value
        return node
    if isinstance(node, yaml.SequenceNode) and isinstance(elem, int) and 0 <= elem < len(node.value):
        return node.value[elem]
    return node


def _render_path(parts: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, default=str)}]"
    return out or "(top level)"


def _message(err: Any) -> str:
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    loc = tuple(err["loc"])
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return _unknown_field_message(loc)
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return (
            f"missing {ctx.get('discriminator')} (which kind of entry this is: 'workstation' or 'warehouse')"
        )
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping (key: value lines), not {_kind_of(err.get('input'))}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, not {_kind_of(err.get('input'))}"
    if kind in ("string_pattern_mismatch",) and ctx.get("pattern", "").startswith("^sha256"):
        return "must be 'sha256:' followed by 64 lowercase hex digits"
    if kind == "string_pattern_mismatch" and "A-Za-z_" in ctx.get("pattern", ""):
        return f"must be an environment variable name (got {_short(err.get('input'))})"
    if "input" in err and not isinstance(err["input"], dict | list) and "(got " not in msg:
        return f"{msg} (got {_short(err['input'])})"
    return msg


def _unknown_field_message(loc: tuple[Any, ...]) -> str:
    field = loc[-1] if loc else "?"
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown field {field!r}"
    allowed = [info.alias or name for name, info in model.model_fields.items()]
    guess = difflib.get_close_matches(str(field), allowed, n=1, cutoff=0.6)
    hint = f" - did you mean {guess[0]!r}?" if guess else ""
    return f"unknown field {field!r}{hint} (allowed: {', '.join(allowed)})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class validating the input at pydantic location ``loc`` (with its tags)."""
    tp: Any = Scenario
    for elem in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = next((f for n, f in tp.model_fields.items() if (f.alias or n) == elem), None)
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (Union, types.UnionType) and elem in UNION_TAGS:
            tp = UNION_TAGS[elem]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({_short(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line_of(node: yaml.Node | None) -> tuple[int | None, ...]:
    return () if node is None else (node.start_mark.line + 1, node.start_mark.column + 1)


def _error(source: str, message: str) -> ScenarioError:
    return ScenarioError([Problem(source, "", message)])
