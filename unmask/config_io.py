"""Configs as data: nested dicts, TOML files and JSON, read strictly (unknown keys and wrong
types are errors that name the flag), and the shipped configs under `unmask/configs/`."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from unmask.config import Config, ConfigError, _check


def _coerce(value: Any, tp: Any, flag: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check(value in typing.get_args(tp), flag, f"must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, list | tuple), flag, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], flag) for v in value)
        _check(len(value) == len(args), flag, f"expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, flag) for v, a in zip(value, args, strict=True))
    if tp is bool:
        _check(isinstance(value, bool), flag, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            flag,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            flag,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), flag, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type | types.UnionType):  # pragma: no cover - not used by our configs
        return value
    raise TypeError(f"unsupported config type {tp} for {flag}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a config dataclass from a nested dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} "
            f"(in {where}; known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _check(isinstance(value, dict), prefix + name, "expected a table/section")
            kwargs[name] = from_dict(tp, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form (tuples as lists), for JSON/TOML."""
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def load_config(path: str | Path) -> Config:
    """Read a TOML config file strictly; a bare name (`tiny-bd3lm`) means a shipped config."""
    path = Path(path)
    if not path.is_file() and (BUILTIN_CONFIGS / f"{path.name.removesuffix('.toml')}.toml").is_file():
        path = BUILTIN_CONFIGS / f"{path.name.removesuffix('.toml')}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.toml")))
        raise ConfigError(f"--config: no such file {path} (shipped configs: {shipped})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from e
    return from_dict(Config, raw)


# Keys that older checkpoints' config.json may hold and that no longer exist: dropped on reading a
# checkpoint (so old runs still load), refused anywhere else like any unknown key.
RETIRED_KEYS = {
    ("train", "eval_batches"),  # validation now reads [eval] (mc_samples, max_rows)
    ("decode", "k"),  # ADJUST's K: now `rounds`, set by the adjust / marginal presets themselves
}


def config_from_json(text: str) -> Config:
    """A checkpoint's config.json -> Config (retired keys of older versions are dropped)."""
    data = json.loads(text)
    for section, key in RETIRED_KEYS:
        data.get(section, {}).pop(key, None)
    return from_dict(Config, data)
