"""Strict construction of the frozen per-stage config dataclasses.

Every stage owns one frozen dataclass (``SampleConfig`` in ``mner.data.sample``,
``ExtractConfig`` in ``mner.extract.config``, ``TrainConfig`` in ``mner.train.config``,
``ReportConfig`` in ``mner.report``); its field defaults are the only place defaults
live. ``params.yaml`` has one section per stage with the same name, and only the CLI
reads it. This module turns a mapping (a YAML section, or ``-o key=value`` overrides)
into such a dataclass and rejects unknown keys and wrong types with one line that
names where the value came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from mner.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Mapping[str, Any] | None, *, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking keys and types.

    Args:
        cls: A dataclass type.
        data: Key/value pairs; missing keys take the dataclass defaults.
        where: Where the values came from, e.g. ``"params.yaml:train"``; used in errors.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On an unknown key or a value of the wrong type.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from None


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and convert where lossless.

    Accepts ints for floats, lists for tuples, strings for paths; never a bool for a
    number or a number for a bool.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # YAML 1.1 reads `amp: off` (and -o amp=off) as false: give the word back.
            word = "on" if value else "off"
            if word in choices:
                value = word
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:
            # "-o seeds=1,2,3" arrives as one string; read each item as YAML does
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        return [coerce(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_overrides(items: list[str] | None, *, where: str = "-o") -> dict[str, Any]:
    """Parse ``key=value`` CLI overrides; values are read as YAML scalars or lists.

    ``a.b=1`` becomes ``{"a": {"b": 1}}`` so nested sections can be overridden.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{where} {item!r}: expected key=value, e.g. -o epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where} {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_section(params: Path | None, section: str) -> dict[str, Any]:
    """Read one section of a params.yaml file (empty when the file or section is absent)."""
    if params is None or not Path(params).exists():
        return {}
    try:
        doc = yaml.safe_load(Path(params).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{params}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{params}: expected a mapping of sections at the top level")
    sec = doc.get(section) or {}
    if not isinstance(sec, Mapping):
        raise ConfigError(f"{params}:{section}: expected a mapping")
    return dict(sec)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A YAML/JSON-friendly dict of a config dataclass (paths as strings, tuples as lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)
