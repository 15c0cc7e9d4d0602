"""Typed configuration: dataclasses built from plain dicts (YAML), with dotted command-line overrides.

Written here rather than taken from a library because the rules are few and strict: every key must be a declared
field (a typo is an error that names the valid keys), every value is checked against the field's type, and nested
dataclasses are built recursively, so a config is validated whole at start-up rather than failing mid-run.
"""
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from `data`, recursively, rejecting unknown keys and ill-typed values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _refuse_old_names(cls, data, where)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}.{name}".lstrip(".")) for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        message = str(error)
        if where and message.startswith(where.split("[")[0]):  # sections that name their keys already (data.*)
            raise ConfigError(message) from error
        raise ConfigError(f"{where or 'config'}: {message}") from error


def _refuse_old_names(cls, data: dict, where: str) -> None:
    """A key a release of this project renamed (the class's RENAMED table, old -> new) is refused with its new name:
    an old config would otherwise get the list of valid keys, or worse, a default in place of its value."""
    renamed = getattr(cls, "RENAMED", {})
    for old in sorted(set(data) & set(renamed)):
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{old} is now {prefix}{renamed[old]}: rename it in the config")


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        converted = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint, value, where: str):
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is int and isinstance(value, float) and value.is_integer():  # 1e5 steps
        value = int(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite float, got {value!r}")
    if hint is str and isinstance(value, Path):
        return str(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def split_override(override: str) -> tuple[str, str]:
    """`key.path=value` -> (key.path, raw value). The one reader of the override syntax (schedules use it too)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    return key.strip(), raw


def parse_value(override: str, raw: str) -> Any:
    """An override's value, read as a YAML scalar (or flow list/mapping); numeric fields also accept `1e-5`."""
    try:
        return read_yaml(raw) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(error)})") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict, returning a new dict."""
    data = _deep_copy(data)
    for override in overrides:
        key, raw = split_override(override)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = parse_value(override, raw)
    return data


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as people write them. YAML 1.1, which PyYAML follows, reads `1e-5` and
    `3e-4` as strings (its floats need a dot), so a float resolver in YAML 1.2's form replaces its own."""


Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                          if tag != "tag:yaml.org,2002:float"]
                                  for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(text_or_stream):
    return yaml.load(text_or_stream, Loader=Loader)


def _deep_copy(data):
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        try:
            data = read_yaml(f) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(error)})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
