"""Config files (`get_config(arg)` in a .py file), `path.py:variant` specs and dotted overrides."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config spec, key or value that cannot be used."""


def _load_module(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    name = "vlm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    return module


def split_spec(spec: str) -> tuple[str, str | None]:
    """'configs/clip.py:tiny' -> ('configs/clip.py', 'tiny')."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, overrides): `--config.a.b=v` / `--config.a.b v` become "a.b=v"; what every
    command line that takes a config uses (the CLI, `plan`, the benchmarks, launch/sweep.py)."""
    rest, overrides, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config.") :])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(spec: str, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies overrides ('a.b=1' strings or a dict) and locks the result."""
    path, arg = split_spec(spec)
    module = _load_module(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    config = ml_collections.ConfigDict(config)
    with config.unlocked():
        config.config_spec = spec
    apply_overrides(config, overrides)
    config.lock()
    return config


def get_sweep(spec: str) -> list[dict[str, Any]]:
    """The override dicts of a config file's optional get_sweep(arg); [] when it has none."""
    path, arg = split_spec(spec)
    module = _load_module(path)
    if not hasattr(module, "get_sweep"):
        return []
    return list(module.get_sweep(arg))


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config, leaves and inner nodes."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(all_keys(value, dotted + "."))
    return keys


def _unknown_key_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.0)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_value(text: str, current: Any) -> Any:
    """A command-line value, read as the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(text)
        except ValueError:
            return int(float(text)) if float(text).is_integer() else _fail(text, "an integer")
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        # "(32, 64)", "[a, b]" or plain "a,b" / "a" (a stage order, a list of kinds).
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [part.strip() for part in text.strip("()[]").split(",") if part.strip()]
        if isinstance(value, (str, int, float)):
            value = [value]
        return type(current)(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def _fail(text: str, what: str):
    raise ConfigError(f"expected {what}, got {text!r}")


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str] | Mapping[str, Any]
) -> None:
    """Sets dotted keys in place. Strings 'a.b=v' are parsed; dict values are used as given."""
    items = overrides.items() if isinstance(overrides, Mapping) else [_split(o) for o in overrides]
    for key, value in items:
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key_error(config, key)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise _unknown_key_error(config, key)
        if isinstance(value, str) and not isinstance(node[leaf], str):
            value = parse_value(value, node[leaf])
        with node.unlocked():
            try:
                node[leaf] = value
            except TypeError as e:  # ml_collections refuses a value of another type
                raise ConfigError(f"{key}={value!r}: {e}") from e


def _split(override: str) -> tuple[str, str]:
    key, sep, value = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    return key.removeprefix("config.").removeprefix("--config."), value


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as JSON text (what a checkpoint stores beside the state)."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of to_json."""
    return ml_collections.ConfigDict(json.loads(text))
