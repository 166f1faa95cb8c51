"""YAML configs with ``--key value`` overrides, checked against a config dataclass before anything runs."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path

import yaml

from align.errors import ConfigError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(argv: list[str]) -> dict:
    """``--key value``, ``--key=value`` or a bare ``--flag`` (true); values are parsed as YAML scalars."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = _scalar(value)
        i += 1
    return out


def _scalar(text: str):
    """YAML scalar, except that numbers YAML 1.1 leaves as strings (``3e-3``) become floats and its
    yes/no/on/off booleans stay strings (``--save_strategy no``)."""
    if text.lower() in ("yes", "no", "on", "off", "y", "n"):
        return text
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in annotation}
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # exotic TrainingArguments types: left to their own validation


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _literal(annotation) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (or ``Literal[...] | None``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ():
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def require(ok: bool, name: str, value, rule: str) -> None:
    """The one range check of every config: ``name=value is out of range: it must be <rule>``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: it must be {rule}")


def build_config(config_cls, values: dict, source: str):
    """Instantiate ``config_cls`` from ``values``; unknown keys, wrong types and bad values raise
    ``ConfigError`` naming ``source`` and the key (with a suggestion for misspelt keys)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; `align train --help-keys` lists them"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        if not _matches(value, hints[key]):
            allowed = _literal(hints[key])
            if allowed is not None:
                raise ConfigError(f"{source}: {key}={value!r}: choose one of {', '.join(map(str, allowed))}")
            raise ConfigError(f"{source}: key {key!r} expects {_type_name(hints[key])}, got {type(value).__name__} {value!r}")
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {err}") from None
