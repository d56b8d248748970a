"""Checking a nested dict against the config dataclasses: keys (with a suggestion), types and ranges, each failure
one ConfigError line (amas.config holds the schema)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from amas.errors import ConfigError

__all__ = ["build_section", "check_range", "check_target", "check_type"]


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(options)}"


def check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce value to the annotated type or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config {path}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return check_type(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config {path}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config {path} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {path} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config {path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config {path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config {path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config {path} must be a string, got {value!r}")
    return value


def check_target(value: float, name: str = "target_reduction") -> float:
    """value as a float when it is a fraction of the MACs to remove, strictly between 0 and 1; else one ConfigError."""
    t = float(value)
    if not 0.0 < t < 1.0:
        what = "removes nothing" if t <= 0 else "removes every MAC"
        raise ConfigError(f"{name}={value} {what}; pass the fraction of the MACs to remove, between 0 and 1 "
                          "(e.g. 0.5 removes half)")
    return t


def check_range(path: str, value: Any, meta: typing.Mapping) -> None:
    """Raise a one-line ConfigError when value is outside the field's range metadata (lo, hi, lo_open)."""
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"config {path}={value} is out of range; it must be {op} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config {path}={value} is out of range; it must be <= {hi}")


def build_section(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """Build dataclass cls from a nested dict, checking keys, types and ranges; unset keys keep base's values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'root'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"{prefix}.{key}" if prefix else key
        raise ConfigError(f"unknown config key '{where}'{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            # a nested section starts from its parent's default (e.g. search.train's own lr and schedule), not tp()
            if base is not None:
                inner = getattr(base, name)
            elif f.default_factory is not dataclasses.MISSING:
                inner = f.default_factory()
            else:
                inner = None
            kwargs[name] = build_section(tp, data[name], path, inner)
        else:
            value = data[name]
            if isinstance(value, bool) and "from_bool" in f.metadata:  # a setting that was a bool (train.amp)
                value = f.metadata["from_bool"][value]
            value = check_type(path, value, tp)
            if f.metadata and value is not None:
                check_range(path, value, f.metadata)
            kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
