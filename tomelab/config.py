"""Typed configs: dataclasses loaded from TOML with strict, friendly validation.

Every stage takes a dataclass config. `load_config(path, Cls)` reads TOML and checks each key
against the dataclass fields, so a typo or a wrong type fails at once with the file, the key
and the fix, rather than silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from tomelab.errors import ConfigError

T = TypeVar("T")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a table"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, file: str) -> Any:
    """Check `value` against the type `tp` and convert nested tables to dataclasses."""

    def fail() -> ConfigError:
        return ConfigError(
            f"{file}: `{where}` must be {_describe(tp)}, got {type(value).__name__} {value!r}. "
            f"Fix the value of `{where}` in {file}."
        )

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where, file)
            except ConfigError:  # try the next member of the union
                pass
        raise fail()
    if origin is Literal:
        if value not in get_args(tp):
            raise fail()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise fail()
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]", file) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, val_tp = get_args(tp) or (str, Any)
        return {k: _convert(v, val_tp, f"{where}.{k}", file) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, file=file, prefix=f"{where}.")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, file: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys, wrong types and missing keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"{file}: unknown key `{prefix}{key}`.{hint} "
                f"Valid keys here: {', '.join(sorted(fields))}."
            )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, file)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{file}: missing required key `{prefix}{name}` ({_describe(hints[name])}). "
                f"Add it to {file}."
            )
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise ConfigError(f"{file}: {prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


_SAFE_NAME = re.compile(r"[A-Za-z0-9._@-]+")  # '@': sweep arms' alias variants (variant@sweep.arm)


def safe_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a variant/run name (it becomes a folder and file name), or None if it can.

    Allowed: letters, digits, `.`, `_`, `@` and `-`, not starting with a dot and without `..`, so a name
    can never point outside artifacts/ or data_cards/ (`../x`, `/tmp/x`) or hide as a dotfile.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        return f"{name!r} may use only letters, digits, '.', '_', '@' and '-'"
    if name.startswith(".") or ".." in name:
        return f"{name!r} must not start with '.' or contain '..'"
    return None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {p} does not exist. Check the path, or copy one from configs/ "
            f"(for example configs/variants/random.toml)."
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; TOML files must be UTF-8. "
            f"Re-save {p} as UTF-8."
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}. Fix the syntax at that line.") from None


def merge_tables(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: tables merge recursively, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in child.items():
        out[k] = merge_tables(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML config with its `extends = "other.toml"` chain merged in (base first; the path is relative
    to the file), so every config kind states only what differs from the one it extends."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"{path}: `extends` makes a cycle: {' -> '.join(str(s) for s in (*_seen, p))}.")
    data = read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must be a file name such as \"small.toml\".")
    return merge_tables(read_config_dict(p.parent / parent, (*_seen, p)), data)


def load_config(path: str | Path, cls: type[T], *, section: str | None = None) -> T:
    """Load TOML `path` (optionally one `[section]` of it) into dataclass `cls`, following `extends`."""
    data = read_config_dict(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: missing section [{section}]. Add it to {path}.")
        data = data[section]
    return from_dict(cls, data, file=str(path))


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain TOML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """A short stable hash of a config, used for lineage and for resume decisions."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
