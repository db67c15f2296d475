"""Config validation: one clear error naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from surfaces_plugin.config import ConfigError, check_encryption, encrypt_new_rooms, parse_settings

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
        ({"streaming": {"first_post_ms": -1}}, "streaming.first_post_ms", "at least 0"),
        ({"streaming": {"max_edits": 0}}, "streaming.max_edits", "at least 1"),
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


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "auto"), ("auto", "auto"), ("on", "on"), (True, "on"), (False, "off")]
)
def test_spaces_encryption_reads_auto_on_off(value, mode) -> None:
    spaces = dict(BASE["spaces"])
    spaces.pop("encryption", None)
    if value is not None:
        spaces["encryption"] = value  # YAML turns a bare on/off into a boolean
    assert parse_settings(with_(spaces=spaces)).spaces.encryption == mode


def test_spaces_encryption_on_without_crypto_is_refused_naming_the_key() -> None:
    on = parse_settings(with_(spaces={**BASE["spaces"], "encryption": "on"}))
    with pytest.raises(ConfigError) as info:
        check_encryption(on, can_encrypt=False)
    assert info.value.key == "spaces.encryption" and "device id" in str(info.value)
    check_encryption(on, can_encrypt=True)
    auto = parse_settings(BASE)
    check_encryption(auto, can_encrypt=False)
    assert (encrypt_new_rooms(auto, True), encrypt_new_rooms(auto, False)) == (True, False)
    assert encrypt_new_rooms(on, True)
    off = parse_settings(with_(spaces={**BASE["spaces"], "encryption": "off"}))
    assert not encrypt_new_rooms(off, True)
    with pytest.raises(ConfigError) as info:
        parse_settings(with_(spaces={**BASE["spaces"], "encryption": "maybe"}))
    assert info.value.key == "spaces.encryption"


LLM = {"id": "llm", "type": "openai", "base_url": "http://127.0.0.1:11434/v1"}
CLOCK = {
    "id": "clock",
    "url": "http://127.0.0.1:8000/mcp",
    "allow": ["now"],
    "headers": {"Authorization": "Bearer mcp-secret-42"},
    "timeout_s": 5,
}


def with_tools(agent_tools, backend=LLM, **server_changes):
    """A config whose one agent `a` on `backend` uses the MCP servers `agent_tools`."""
    return with_(
        backends=[backend],
        agents=[{"id": "a", "backend": backend["id"], "tools": agent_tools}],
        default_agent="a",
        mcp_servers=[{**CLOCK, **server_changes}],
    )


def test_mcp_servers_and_agent_tools_are_read() -> None:
    settings = parse_settings(with_tools(["clock"]))
    clock = settings.mcp_servers["clock"]
    assert (clock.url, clock.allow, clock.timeout_s) == ("http://127.0.0.1:8000/mcp", ("now",), 5)
    assert clock.headers == {"Authorization": "Bearer mcp-secret-42"}
    assert "mcp-secret-42" not in repr(clock) and "mcp-secret-42" not in repr(settings)
    assert settings.agents["a"].tools == ("clock",)
    assert parse_settings(BASE).mcp_servers == {}


@pytest.mark.parametrize(
    ("config", "key", "words"),
    [
        (with_tools(["clock", "weather"]), "agents[0].tools[1]", "'weather' is not one of the `mcp_servers`"),
        (with_tools(["clock"], backend={"id": "e", "type": "echo"}), "agents[0].tools", "echo backend cannot call tools"),
        (with_tools([], headers={"Authorization": 42}), "mcp_servers[0].headers", "must map header names to strings"),
        (with_tools([], headers=["Authorization"]), "mcp_servers[0].headers", "must map header names to strings"),
        (with_tools([], url="stdio:clock"), "mcp_servers[0].url", "http(s) URL"),
        (with_tools([], allow=[]), "mcp_servers[0].allow", "must list the tool names"),
        (with_tools([], timeout_s=0), "mcp_servers[0].timeout_s", "at least 1"),
    ],
)
def test_invalid_mcp_config_names_the_key(config, key, words) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(config)
    assert raised.value.key == key
    assert words in str(raised.value)
    assert "mcp-secret-42" not in str(raised.value)


def anthropic(**fields):
    return with_(backends=[{"id": "echo", "type": "echo"}, {"id": "claude", "type": "anthropic", **fields}])


def test_anthropic_backend_defaults_to_the_public_api() -> None:
    spec = parse_settings(anthropic(api_key="sk-ant-SECRET")).backends["claude"]
    assert (spec.type, spec.base_url, spec.api_key) == ("anthropic", "https://api.anthropic.com/v1", "sk-ant-SECRET")
    assert (spec.timeout_s, spec.max_retries) == (60, 2)


def test_anthropic_backend_takes_another_base_url() -> None:
    spec = parse_settings(anthropic(base_url="http://127.0.0.1:8080/v1/")).backends["claude"]
    assert spec.base_url == "http://127.0.0.1:8080/v1"


@pytest.mark.parametrize(
    ("fields", "key"),
    [({"base_url": "api.anthropic.com"}, "backends[1].base_url"), ({"api": "responses"}, "backends[1].api")],
)
def test_anthropic_backend_refuses_what_it_cannot_use(fields, key) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(anthropic(**fields))
    assert info.value.key == key


def _openai(**fields):
    backend = {"id": "o", "type": "openai", "base_url": "http://x/v1", **fields}
    return {"backends": [{"id": "echo", "type": "echo"}, backend]}


def test_openai_backends_default_to_chat_completions_replayed() -> None:
    spec = parse_settings(with_(**_openai())).backends["o"]
    assert (spec.api, spec.state) == ("chat", "replay")


@pytest.mark.parametrize("state", ["replay", "server"])
def test_responses_api_takes_either_state(state) -> None:
    spec = parse_settings(with_(**_openai(api="responses", state=state))).backends["o"]
    assert (spec.api, spec.state) == ("responses", state)


@pytest.mark.parametrize(
    ("fields", "key", "words"),
    [
        ({"api": "assistants"}, "backends[1].api", "must be one of chat, responses"),
        (
            {"api": "responses", "state": "cloud"},
            "backends[1].state",
            "must be one of replay, server",
        ),
        ({"state": "server"}, "backends[1].state", "needs `api: responses`"),
        ({"api": 3}, "backends[1].api", "must be a string"),
    ],
)
def test_invalid_api_or_state_names_the_key(fields, key, words) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(with_(**_openai(**fields)))
    assert info.value.key == key and words in str(info.value)


def test_only_openai_backends_choose_an_api() -> None:
    data = with_(backends=[{"id": "echo", "type": "echo", "api": "responses"}])
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert info.value.key == "backends[0].api" and "only openai" in str(info.value)
