"""Generic dataclass <-> plain-data conversion for the configuration: strict about unknown keys
(with a "did you mean") and types, exact on round trips, and YAML that reads ``1e-4`` as a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

import yaml

from stackwise.exceptions import ConfigurationError

# The largest integer any configuration value may take (int64 arithmetic in torch, sizes in the
# native kernels): a larger one is a typo, never a size.
INT_LIMIT = 2**62


class _Loader(yaml.SafeLoader):
    """SafeLoader that also resolves exponent numbers without a dot (``1e-4``, ``5E3``) as
    floats (plain YAML 1.1 reads them as strings), and refuses a mapping that repeats a key
    (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigurationError(
                    f"duplicate key {key!r} on line {line} (first set on line {seen[key]})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
        |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def yaml_dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def choice(default: str, allowed: tuple[str, ...]) -> Any:
    """A dataclass field whose value must be one of ``allowed``: the one place a key's allowed
    values are written (validation and the configuration reference read them from here)."""
    if default not in allowed:
        raise ValueError(f"default {default!r} is not one of {allowed}")
    return dataclasses.field(default=default, metadata={"choices": tuple(allowed)})


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values declared on a field by :func:`choice`, or None."""
    return f.metadata.get("choices")


def config_choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of field ``name`` of the config dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name and field_choices(f) is not None:
            return field_choices(f)
    raise KeyError(f"{cls.__name__}.{name} declares no allowed values")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return False, tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples and ints to
    floats where the annotation asks), or raise ConfigurationError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigurationError(f"must not be null (expected {_type_name(tp)})", key)
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"expected a mapping (section {tp.__name__}), got {type(value).__name__} {value!r}",
                key,
            )
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigurationError(f"expected a list, got {type(value).__name__} {value!r}", key)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigurationError(
                    f"expected {len(args)} values, got {len(value)}: {value!r}", key
                )
            return tuple(
                coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        elem = args[0] if args else Any
        out = [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"expected a mapping, got {type(value).__name__} {value!r}", key
            )
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigurationError(f"{value!r} is not one of {list(allowed)}", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(
                f"expected a number, got {type(value).__name__} {value!r}", key
            )
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            raise ConfigurationError(f"{value} is out of range (at most {INT_LIMIT})", key)
        if not math.isfinite(value):
            raise ConfigurationError(f"must be a finite number, got {value!r}", key)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(
                f"expected an integer, got {type(value).__name__} {value!r}", key
            )
        if abs(value) > INT_LIMIT:
            raise ConfigurationError(f"{value} is out of range (at most {INT_LIMIT})", key)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"expected true or false, got {value!r}", key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigurationError(
                f"expected a string, got {type(value).__name__} {value!r}", key
            )
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigurationError(f"expected {_type_name(tp)}, got {value!r}", key)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with the closest known key."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {sorted(names)}"
            raise ConfigurationError(f"unknown key{hint}", dotted)
        kwargs[key] = coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigurationError(
                f"cannot set {dotted}: {'.'.join(parts[: i + 1])} is not a section", dotted
            )
        node = nxt
    node[parts[-1]] = value
