"""YAML helpers for writing maubot configs: load the plugin's base config, deep-merge overrides."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from devtools import REPO_ROOT


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def dump_yaml(data: Any) -> str:
    yaml = YAML()
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def deep_merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of base with overrides applied: dicts merge key by key, lists and scalars replace."""
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def plugin_config(
    overrides: dict[str, Any] | None = None, repo_root: Path = REPO_ROOT
) -> dict[str, Any]:
    """The plugin's base-config.yaml merged with overrides."""
    return deep_merge(load_yaml(repo_root / "base-config.yaml") or {}, overrides)


def plugin_config_yaml(overrides: dict[str, Any] | None = None, repo_root: Path = REPO_ROOT) -> str:
    """Instance config text for the full server: base-config.yaml with overrides, as YAML."""
    return dump_yaml(plugin_config(overrides, repo_root))


def logging_config(log_path: Path) -> dict[str, Any]:
    """Python logging to one file; client HTTP at TRACE (5) because sync completions log there."""
    return {
        "version": 1,
        "formatters": {"plain": {"format": "[%(asctime)s] [%(levelname)s@%(name)s] %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_path),
                "formatter": "plain",
            }
        },
        "loggers": {
            "maubot": {"level": "DEBUG"},
            "maubot.client": {"level": 5},
            "mau": {"level": "DEBUG"},
            "aiohttp": {"level": "INFO"},
        },
        "root": {"level": "DEBUG", "handlers": ["file"]},
    }
