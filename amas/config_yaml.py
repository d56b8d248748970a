"""Config files as plain dicts: YAML mappings read with one-line errors, dotted key=value overrides set into them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from amas.errors import ConfigError

__all__ = ["apply_overrides", "read_yaml"]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override '{item}' has no key; write key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted key=value overrides into a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
        node[keys[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping or raise a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file with --config (see configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{p}' is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections (model:, data:, train:, ...)")
    return data
