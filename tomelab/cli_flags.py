"""Command-line flags generated from a config dataclass, so each option is declared once.

Like TRL's `HfArgumentParser`: every field becomes `--field-name`, its type comes from the annotation
(`Literal[...]` gives choices, `bool` gives `--flag/--no-flag`, `X | None` is X, `list[X]` takes
several values) and its help from `field(metadata={"help": ...})`. Flags default to None ("not
given"), so a TOML config loaded first keeps its values unless a flag overrides them
(`dataclass_overrides`); the help line shows the dataclass default.

Field metadata keys: `help`, `flag` (another flag name, e.g. "--results"), `choices` (when they are
computed rather than a `Literal`), `metavar`, and `cli: False` to leave a field out.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kwargs(f: dataclasses.Field, tp: Any, help_text: str | None) -> dict[str, Any]:
    tp = _strip_optional(tp)
    kw: dict[str, Any] = {"dest": f.name, "default": None}
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    text = help_text if help_text is not None else f.metadata.get("help", "")
    if default is not None and default is not False and default not in ("", [], ()) and "(default" not in text:
        text = f"{text} (default {default})" if text else f"default {default}"
    kw["help"] = text.replace("%", "%%")
    kw["metavar"] = f.metadata.get("metavar") or flag_name(f).lstrip("-").replace("-", "_").upper()
    origin = get_origin(tp)
    if tp is bool:
        del kw["metavar"]
        kw["action"] = argparse.BooleanOptionalAction
        return kw
    if origin is Literal or "choices" in f.metadata:
        kw.pop("metavar")
    if origin is Literal:
        values = get_args(tp)
        kw["choices"] = list(values)
        kw["type"] = type(values[0])
        return kw
    if origin in (list, tuple):
        item = (get_args(tp) or (str,))[0]
        kw["nargs"] = "+"
        tp = _strip_optional(item)
    if tp in (int, float, str, Path):
        kw["type"] = tp
    else:
        raise TypeError(f"{f.name}: no command-line flag for type {tp!r}; set metadata cli=False")
    if "choices" in f.metadata:
        kw["choices"] = list(f.metadata["choices"])
    return kw


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                       only: Iterable[str] | None = None, skip: Iterable[str] = (),
                       help_texts: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of dataclass `cls` (all, or those in `only`, minus `skip` and `cli: False`).

    `help_texts` supplies help for fields whose metadata has none. Returns the field names added."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(only) if only is not None else list(fields)
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    added = []
    for name in names:
        f = fields[name]
        if name in skip or not f.metadata.get("cli", True):
            continue
        parser.add_argument(flag_name(f), **_kwargs(f, hints[name], (help_texts or {}).get(name)))
        added.append(name)
    return added


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """{field: value} for every field of `cls` whose flag was given (not None) in `args`."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = tuple(v) if isinstance(f.default, tuple) and isinstance(v, list) else v
    return out


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **meta: Any) -> Any:
    """A dataclass field with its command-line help (and `flag`, `choices`, `metavar`, `cli`) in metadata."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **meta})
