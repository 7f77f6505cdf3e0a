"""Reading and writing configs: nested dicts and YAML in, the frozen ``Config`` tree out, with errors that name the
dotted key and the nearest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from esr.config.schema import Config, ConfigError

# ----------------------------------------------------------------------------------------------------------------
# Building the tree from nested dicts, with errors that name the key.


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), [prefix + n for n in names]))
        kwargs[key] = _build(value, hints[key], prefix + key)
    return cls(**kwargs)


def _build(value: Any, hint: Any, key: str) -> Any:
    """One field's value: a section (a dataclass, or an optional one given as a mapping), a list of sections
    (``tuple[Section, ...]``, e.g. ``data.mix``: items named ``data.mix[1].``), or a plain value."""
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, key + ".")
    args = typing.get_args(hint)
    section = next((a for a in args if dataclasses.is_dataclass(a)), None)
    if typing.get_origin(hint) is tuple and section is not None:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list of mappings, got {type(value).__name__}")
        return tuple(from_dict(item, section, f"{key}[{i}].") for i, item in enumerate(value))
    if section is not None and value is not None:
        return from_dict(value, section, key + ".")
    return _coerce(value, hint, key)


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.4)
            hint_text = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.{hint_text}")
        return value
    if origin is tuple:  # a list in YAML (`[a, b]`), or one bare value for a list of one
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(item, typing.get_args(hint)[0], key) for item in items)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{key} must be a {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what `config.yaml` in a run folder holds)."""
    return _lists(dataclasses.asdict(cfg))


def _lists(value: Any) -> Any:
    """Tuples (``data.mix``) as lists, so YAML and JSON write them plainly and ``from_dict`` reads them back."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to nested dict ``data`` (values parsed as YAML scalars)."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        value = _parse_yaml(raw, f"override '{item}'") if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node[parts[-1]] = value
    return out


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with its errors as ConfigError. safe_load builds plain data only, so a tag that would make
    the loader run code (``!!python/object/apply:os.system``) fails to construct; the message says it was refused."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{where} is not valid YAML for esr: {_yaml_problem(e)}. A config is plain data; YAML "
                          "tags such as !!python/... are refused because loading them would run code") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line ("expected ..., but found ... at line 3, column 7"), for a one-line CLI message."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ", ".join(part for part in (error.context, error.problem) if part) + at


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate, return the frozen tree."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                              "save it as UTF-8") from None
        data = _config_mapping(_parse_yaml(text, str(path)), path)
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


def _config_mapping(data: Any, path: Path) -> dict[str, Any]:
    """A config file's top level: a mapping with at least one key. An empty file would silently train the defaults'
    (large) models, a list or a scalar means the file is something else."""
    example = "a config is a YAML mapping of sections like `student: {name: tiny-student}`; start from " \
              "configs/smoke.yaml (tiny models) or configs/quickstart.yaml"
    if data is None or data == {}:
        raise ConfigError(f"{path} is empty (no settings): {example}")
    if not isinstance(data, dict):
        what = "a list" if isinstance(data, list) else f"a single {type(data).__name__} ({str(data)[:40]!r})"
        raise ConfigError(f"{path} holds {what}, not a mapping of settings: {example}")
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``config.yaml`` atomically (a crash mid-write must not leave a run folder that cannot be resumed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
