"""Strict construction of the frozen per-stage config dataclasses.

Every stage owns one frozen dataclass (``SampleConfig`` in ``mner.data.sample``,
``ExtractConfig`` in ``mner.extract.config``, ``TrainConfig`` in ``mner.train.config``,
``ReportConfig`` in ``mner.report``); its field defaults are the only place defaults
live. ``params.yaml`` has one section per stage with the same name, and only the CLI
reads it. :func:`configure` is the one path every command takes: the ``--params``
section, then the command's flags, then ``-o/--set key=value`` overrides (later wins),
each checked on its own so that an unknown key or a wrong type is one line naming the
key and where it came from.

Values are read as users write them, in params.yaml and ``-o`` alike: ``1e-3`` and
``5E-5`` are numbers (YAML 1.2, where PyYAML's YAML 1.1 reads them as strings),
``off``/``on`` stay words for a choice field that offers them, ``true``/``false`` are
booleans, ``null``, ``none`` and ``~`` mean "not set" for an optional field, and a
list may be written ``1,2,3``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from mner.errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax (``1e-3`` is a number).

    YAML 1.1 wants a dot in a float (``1.0e-3``), so ``lr: 1e-3`` would be the string
    ``'1e-3'``; nobody means that. Everything else is read as ``yaml.safe_load`` does.
    """


# Copy the resolver table before changing it, so yaml.SafeLoader itself is untouched.
_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

#: Words that mean "not set" for an optional field (YAML itself knows null and ~).
_NONE_WORDS = frozenset({"none", "null", "~"})


def load_yaml(text: str) -> Any:
    """Parse YAML the way users mean it (see :class:`_Loader`); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
    # A config class may list options it renamed (old -> new) in a ``renamed_options``
    # ClassVar: an old name (params file, a run folder's config.yaml, -o) is refused with
    # its new name rather than as an unknown key.
    renamed = getattr(cls, "renamed_options", None) or {}
    old = sorted(k for k in data if k in renamed and k not in fields)
    if old:
        new = renamed[old[0]]
        raise ConfigError(f"{where}: {old[0]} was renamed to {new}; write {new} instead of {old[0]}")
    _check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from None


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and convert where lossless.

    Accepts ints for floats, lists for tuples, strings for paths, ``"1,2,3"`` or a single
    value for a list, and ``none``/``null``/``~`` for ``None`` in an optional field;
    never a bool for a number or a number for a bool.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (
            value is None
            or (
                isinstance(value, str)
                and value.strip().lower() in _NONE_WORDS
                and not any(value in get_args(a) for a in args if get_origin(a) is Literal)
            )
        ):
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
        args = get_args(tp)
        variadic = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        if isinstance(value, str):
            value = _comma_list(value, where)
        elif variadic and not isinstance(value, (list, tuple)) and value is not None:
            value = [value]  # "-o seeds=5" or "features: resnet": a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
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


def _comma_list(text: str, where: str) -> list[Any]:
    """``"1,2,3"`` (``-o seeds=1,2,3``, ``--seeds 1,2,3``) as a list of YAML scalars.

    An empty item (``1,,2``, a trailing comma, or nothing at all) is an error rather than
    silently dropped: ``1,,2`` is more likely a typo for ``1,2,2`` or ``1,12`` than ``1,2``.
    """
    items = text.split(",")
    if not text.strip() or any(not item.strip() for item in items):
        raise ConfigError(
            f"{where}: {text!r} has an empty item; write values separated by commas, e.g. 1,2,3"
        )
    try:
        return [load_yaml(item.strip()) for item in items]
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read {text!r} as values separated by commas") from None


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
        if not key.strip():
            raise ConfigError(f"{where} {item!r}: expected key=value, e.g. -o epochs=3")
        try:
            value = load_yaml(raw) if raw.strip() else ""
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


#: A stage's hook that reroutes ``-o`` keys before they are checked: called with the
#: parsed overrides and the values merged so far (params section + flags), it returns
#: the overrides to apply. Train uses it to send ``-o no_cm=true`` into ``head``.
RouteOverrides = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def configure(
    cls: type[T],
    section: str,
    *,
    params: Path | None = None,
    values: Mapping[str, Any] | None = None,
    values_where: str | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    route: RouteOverrides | None = None,
) -> T:
    """Build a stage's frozen config: params section, then flags, then ``-o`` (later wins).

    This is the one path every command takes. Each source is checked on its own before
    they are merged, so an unknown key or a wrong type names the key and where it came
    from (``params.yaml:train.epochs``, ``--seeds``, ``-o lr_head``); the merged values
    are then built once, and a rule that spans fields (``__post_init__``) names the
    sources that were merged.

    Args:
        cls: the stage's config dataclass (e.g. ``TrainConfig``).
        section: its section name in params.yaml (e.g. ``"train"``).
        params: a params.yaml path; its ``section`` is read (absent file or section:
            nothing). Ignored when ``values`` is given.
        values: the section's values already read (API callers, tests).
        values_where: where ``values`` came from, for messages (default
            ``"params.yaml:<section>"``).
        flags: the command's named options by field name; ``None`` means not given.
            Errors name them as ``--field-name``.
        overrides: ``key=value`` strings from ``-o/--set`` (``a.b=1`` sets a nested key).
        route: a stage's hook to reroute override keys (see :data:`RouteOverrides`).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: one line naming the key, the source and the problem.
    """
    if values is None:
        values = load_section(params, section)
        file_where = f"{params}:{section}"
    else:
        file_where = values_where or f"params.yaml:{section}"
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    sources: list[str] = []

    if values:
        _check_keys(values, fields, file_where)
        for k, v in values.items():
            coerce(hints[k], v, f"{file_where}.{k}")
        sources.append(file_where)
    merged = dict(values)

    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if given:
        for k, v in given.items():
            if k not in fields:  # a programming error in a command, not a user's
                raise TypeError(f"{cls.__name__} has no field {k!r} for a flag")
            coerce(hints[k], v, "--" + k.replace("_", "-"))
        merged = merge(merged, given)
        sources.append("flags")

    over = parse_overrides(list(overrides or []))
    if route is not None and over:
        over = route(over, merged)
    if over:
        _check_keys(over, fields, "-o")
        for k, v in over.items():
            coerce(hints[k], v, f"-o {k}")
        merged = merge(merged, over)
        sources.append("-o")

    if sources == [file_where]:
        where = file_where
    elif sources:
        where = f"{section} ({' + '.join('params' if s == file_where else s for s in sources)})"
    else:
        where = section
    return build(cls, merged, where=where)


def _check_keys(data: Mapping[str, Any], fields: Mapping[str, Any], where: str) -> None:
    """ConfigError naming every key of ``data`` that is not in ``fields``."""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )


def load_section(params: Path | None, section: str) -> dict[str, Any]:
    """Read one section of a params.yaml file (empty when the file or section is absent)."""
    if params is None or not Path(params).exists():
        return {}
    try:
        doc = load_yaml(Path(params).read_text(encoding="utf-8")) or {}
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
