"""Config validation: one clear error naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from surfaces_plugin.config import ConfigError, parse_settings

BASE = YAML(typ="safe").load((Path(__file__).parents[2] / "base-config.yaml").read_text())


def with_(**changes):
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def test_base_config_is_valid_and_echo_is_default() -> None:
    settings = parse_settings(BASE)
    assert settings.default_agent == "echo"
    assert settings.backends["echo"].type == "echo"


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"backends": [{"id": "x", "type": "gpt"}]}, "backends[0].type", "unknown backend type 'gpt'"),
        (
            {"agents": [{"id": "a", "backend": "nope"}], "default_agent": "a"},
            "agents[0].backend",
            "names backend 'nope'",
        ),
        ({"default_agent": "ghost"}, "default_agent", "'ghost' is not one of the agents"),
        ({"access": {"mode": "allowlist", "allowed": ["alice"]}}, "access.allowed[0]", "not a user id pattern"),
        ({"access": {"mode": "sometimes"}}, "access.mode", "must be one of"),
        ({"access": {"admins": ["bob"]}}, "access.admins[0]", "not a Matrix user id"),
        ({"command_prefix": "a b"}, "command_prefix", "one word"),
        ({"streaming": {"edit_interval_ms": "fast"}}, "streaming.edit_interval_ms", "number"),
        ({"spaces": {"name_template": "{nickname}"}}, "spaces.name_template", "{displayname}"),
        (
            {"backends": [{"id": "echo", "type": "echo"}, {"id": "o", "type": "openai"}]},
            "backends[1].base_url",
            "http(s) base_url",
        ),
    ],
)
def test_invalid_config_names_the_key(changes, key, words) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(with_(**changes))
    assert info.value.key == key
    assert key in str(info.value) and words in str(info.value)


def test_api_key_is_not_in_repr() -> None:
    settings = parse_settings(
        with_(backends=[{"id": "echo", "type": "openai", "base_url": "http://x", "api_key": "sk-SECRET"}])
    )
    assert "sk-SECRET" not in repr(settings)
