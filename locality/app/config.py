"""OmegaConf resolvers and config validation for the Hydra entry points.

Resolvers:
* ``${locality_root:}`` – the project root: $LOCALITY_ROOT, else the checkout holding this
  package (the folder with pyproject.toml and conf/), else the current directory.
* ``${run_token:}`` – six hex digits drawn once per process, so two runs started in the same
  second never share a run directory.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

_RUN_TOKEN = secrets.token_hex(3)


class ConfigError(ValueError):
    """A config value of the wrong type or range; the message names the key and the fix."""


def project_root() -> Path:
    env = os.environ.get("LOCALITY_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").exists() and (here / "conf").is_dir():
        return here
    return Path.cwd().resolve()


def config_dir() -> Path:
    return project_root() / "conf"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("locality_root"):
        OmegaConf.register_new_resolver("locality_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("run_token"):
        OmegaConf.register_new_resolver("run_token", lambda: _RUN_TOKEN)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def get_int(node: Any, key: str, prefix: str, minimum: int | None = None, optional: bool = False) -> int | None:
    value = node.get(key) if hasattr(node, "get") else None
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{_key(prefix, key)} must be an integer{' or null' if optional else ''}, got {_describe(value)}; "
            f"fix it with e.g. {_key(prefix, key)}={minimum if minimum is not None else 1}"
        )
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_key(prefix, key)} must be ≥ {minimum}, got {value}")
    return value


def get_float(node: Any, key: str, prefix: str, low: float | None = None, high: float | None = None,
              low_open: bool = False) -> float:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{_key(prefix, key)} must be a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{_key(prefix, key)} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{_key(prefix, key)} must be {'>' if low_open else '≥'} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{_key(prefix, key)} must be ≤ {high}, got {value}")
    return value


def get_bool(node: Any, key: str, prefix: str) -> bool:
    value = node.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"{_key(prefix, key)} must be true or false, got {_describe(value)}")
    return value


def get_choice(node: Any, key: str, prefix: str, choices: tuple[str, ...]) -> str:
    value = node.get(key)
    if value not in choices:
        raise ConfigError(f"{_key(prefix, key)} must be one of {', '.join(choices)}, got {_describe(value)}")
    return value


def check_finite_numbers(node: Any, prefix: str) -> None:
    """Refuse inf and nan anywhere under ``node`` (YAML reads ``inf``/``.nan`` as floats, which no
    model parameter accepts)."""
    from omegaconf import OmegaConf

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{name}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")

    walk(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node, prefix)
