"""Presets, YAML files and ``section.key=value`` overrides merged into the typed :class:`Config`.

Unknown keys and values of the wrong type are refused with the key's dotted name (a
:class:`~nfsd_nerf.errors.UserError`); tuples, which YAML cannot express, are converted from lists.
The types are the ones the run can compute with: an integer fits torch's int64 and a number is
finite (no setting means anything by nan or inf; a setting that can be off is unset, None).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError
from .sections import Config

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Presets shipped inside the package (a link to the repository's top-level ``configs/``)."""

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""The integers a setting may hold: torch computes with int64, and Python's unbounded ints overflow
there ("Overflow when unpacking long long") long after the run folder exists."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB; presets are ~2 KiB): /dev/zero or a stray binary is refused, not read forever."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's annotation; convert what YAML cannot express (tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        if not INT_MIN <= value <= INT_MAX:
            raise UserError(f"{key}: {_short(value)} is out of range (integers are 64-bit: -2^63 to 2^63-1)")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise UserError(f"{key}: expected a finite number, got {_short(value)}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug, not user input


def _short(value: Any) -> str:
    """A value for a one-line message: a 400-digit integer is cut, not printed."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``updates`` applied and type-checked."""
    if not isinstance(updates, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {updates!r}")
    hints = _hints(type(cfg))
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise UserError(f"unknown config key {key!r} (known: {known})")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            changes[name] = merge(current, value, f"{key}.")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(cfg, **changes)


def parse_override(text: str) -> dict:
    """``"render.size=32"`` -> ``{"render": {"size": 32}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {text!r}: empty key")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: Path) -> dict:
    """Read a preset or a run's config; errors name the file. At most :data:`MAX_CONFIG_BYTES` are
    read, and only UTF-8 text is parsed (a device or a binary file is refused, not read or decoded)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"config {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a YAML config")
        data = yaml.safe_load(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text: not a YAML config") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping at the top level")
    return data


def preset_path(name: str) -> Path:
    """Path of a preset shipped with the package (``default``, ``builtin``, ``cpu``...)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise UserError(f"unknown preset {name!r} (known: {known})")
    return path


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides, in that order."""
    cfg = Config()
    if path is not None:
        cfg = merge(cfg, read_yaml(path))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain-YAML form (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    return merge(Config(), data)
