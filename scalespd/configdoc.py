"""The config reference, generated from the models' field docstrings.

`python -m scalespd.configdoc` prints docs/config.md (a test keeps the committed file equal to
it); `commented_yaml(cfg)` is the resolved config with each field's meaning as a comment, which
`python -m scalespd.run --show-config` prints.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from scalespd.config import RunConfig

_WIDTH = 96


def _type_str(tp: Any) -> str:
    """A short, readable form of a field's type (`int`, `'auto' | float`, `list[ModuleSpec]`)."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _type_str(get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_str(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_str(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _constraints(field: FieldInfo) -> str:
    """Bounds of a numeric field, e.g. `> 0`, `[0, 1]`."""
    lo = hi = ""
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            lo = f"> {m.gt}"
        elif isinstance(m, annotated_types.Ge):
            lo = f">= {m.ge}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {m.lt}"
        elif isinstance(m, annotated_types.Le):
            hi = f"<= {m.le}"
    return ", ".join(x for x in (lo, hi) if x)


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """Config models a field's type refers to (the variants of a union included)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in get_args(tp) for m in _models_in(a)]


def _flow(value: Any) -> str:
    """One-line YAML for a JSON-able value."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    return text.removesuffix("...").strip()


def _default_str(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json") for v in value]
    return f"`{_flow(value)}`"


def _section(model: type[BaseModel], path: str, out: list[str], seen: set[str]) -> None:
    out += [f"## `{path}`" + (f" ({model.__name__})" if "." in path or path else ""), ""]
    if model.__doc__:
        out += [inspect.cleandoc(model.__doc__), ""]
    out += ["| field | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        bounds = _constraints(field)
        kind = _type_str(field.annotation) + (f" ({bounds})" if bounds else "")
        meaning = " ".join((field.description or "").split())
        cells = [f"`{name}`", kind, _default_str(field), meaning]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for sub in _models_in(field.annotation):
            nested.append((sub, f"{path}.{name}" if path else name))
    out.append("")
    for sub, sub_path in nested:
        key = f"{sub_path}:{sub.__name__}"
        if key not in seen:
            seen.add(key)
            _section(sub, sub_path, out, seen)


def reference_markdown() -> str:
    """docs/config.md: every section and field of a run config with its type, default and
    meaning."""
    out = ["# Config reference", "",
           "Generated from `scalespd/config.py` by `python -m scalespd.configdoc` (a test keeps "
           "this file current). Every section rejects unknown keys; numbers and booleans are "
           "strict (`true` is not 1, `\"yes\"` is not a boolean). Change one field from the "
           "command line with `--set section.field=VALUE` (VALUE is YAML). "
           "`python -m scalespd.run --show-config [cfg.yaml]` prints a resolved config with "
           "these meanings as comments.", ""]
    _section(RunConfig, "", out, set())
    out[out.index("## ``")] = "## Top level (RunConfig)"
    return "\n".join(out).rstrip() + "\n"


def commented_yaml(cfg: BaseModel, indent: int = 0) -> str:
    """`cfg` as YAML, each field preceded by its meaning as a `#` comment."""
    pad = " " * indent
    lines: list[str] = []
    dumped = cfg.model_dump(mode="json")
    for name, field in type(cfg).model_fields.items():
        for line in textwrap.wrap(" ".join((field.description or "").split()),
                                  _WIDTH - indent - 2):
            lines.append(f"{pad}# {line}")
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(commented_yaml(value, indent + 2))
        else:
            lines.append(f"{pad}{name}: {_flow(dumped[name])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
