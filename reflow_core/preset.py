"""Presets: the shipped YAML configs (`reflow_core/presets/*.yaml`, package data) or any YAML path, with dotted
overrides at any depth (`pairs.grid.rho`), validated into a `PipelineConfig`."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from .config import ConfigError, PipelineConfig, validate

PRESET_DIR = Path(str(importlib.resources.files("reflow_core") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def raw_preset(name_or_path: str) -> tuple[Path, dict]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {preset_names()} or give a YAML path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return path, raw


def apply_overrides(raw: dict, overrides: dict | None) -> dict:
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parents[:i + 1])} is {node!r}, not a section")
        node[leaf] = value
    return raw


def load_preset(name_or_path: str, overrides: dict | None = None) -> PipelineConfig:
    """Load a preset by name (reflow_core/presets/NAME.yaml, shipped in the package) or by path, apply dotted
    overrides (any depth: `pairs.grid.rho`), validate."""
    path, raw = raw_preset(name_or_path)
    return validate(apply_overrides(raw, overrides), str(path))
