"""Typed, validated views of base-config.yaml.

`Config` is maubot's proxy over the YAML; `parse_settings` turns its plain data into frozen
dataclasses and raises `ConfigError` naming the offending key, so one clear message reaches the log.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from mautrix.util.config import BaseProxyConfig, ConfigUpdateHelper

BACKEND_TYPES = ("echo", "openai", "anthropic")
OPENAI_APIS = ("chat", "responses")
CONVERSATION_STATES = ("replay", "server")
ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
ACCESS_MODES = ("open", "allowlist", "approval")
ENCRYPTION_MODES = ("auto", "on", "off")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MXID_RE = re.compile(r"^@[^:\s]+:\S+$")

# Every top-level key of base-config.yaml; do_update copies each one so none is reset.
TOP_LEVEL_KEYS = (
    "command_prefix",
    "access",
    "onboarding",
    "spaces",
    "backends",
    "agents",
    "default_agent",
    "streaming",
    "reconciliation",
    "limits",
    "mcp_servers",
    "tools",
    "media",
    "speech",
)


class Config(BaseProxyConfig):
    def do_update(self, helper: ConfigUpdateHelper) -> None:
        for key in TOP_LEVEL_KEYS:
            helper.copy(key)


def plain_config(config: BaseProxyConfig) -> dict[str, Any]:
    """The top-level keys of a loaded proxy config as a plain mapping."""
    return {key: config[key] for key in TOP_LEVEL_KEYS if key in config}


class ConfigError(ValueError):
    """A config value is invalid; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"invalid config at `{key}`: {message}")
        self.key = key


@dataclass(frozen=True)
class BackendSpec:
    id: str
    type: Literal["echo", "openai", "anthropic"]
    base_url: str = ""
    api_key: str = field(default="", repr=False)  # never printed
    timeout_s: float = 60.0
    max_retries: int = 2
    # openai only: chat completions, or the Responses API ...
    api: Literal["chat", "responses"] = "chat"
    # ... which either gets the transcript every turn (replay) or continues a conversation the
    # platform keeps (server: `platform_chat_id` is the platform's conversation id).
    state: Literal["replay", "server"] = "replay"


@dataclass(frozen=True)
class McpServerSpec:
    """An MCP server reached over streamable HTTP; only the tools in `allow` are offered."""

    id: str
    url: str
    allow: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold secrets
    timeout_s: float = 30.0  # per tool call

    def __hash__(self) -> int:
        return hash((self.id, self.url, self.allow))


@dataclass(frozen=True)
class MediaSettings:
    """What files users may send into working rooms, and how much of them a request carries."""

    image_types: tuple[str, ...] = ("image/png", "image/jpeg", "image/gif", "image/webp")
    max_image_bytes: int = 10_000_000
    max_file_bytes: int = 2_000_000
    max_file_chars: int = 40_000  # of a file's text in a request (the rest is left out, visibly)
    max_audio_bytes: int = 25_000_000


@dataclass(frozen=True)
class SpeechSettings:
    """Speech to text for voice messages and text to speech for voice answers, each through an
    OpenAI-compatible backend (`/audio/transcriptions`, `/audio/speech`); "" turns it off."""

    transcription_backend: str = ""
    transcription_model: str = "whisper-1"
    voice_backend: str = ""
    voice_model: str = "tts-1"
    voice: str = "alloy"


@dataclass(frozen=True)
class ToolSettings:
    max_steps: int = 6  # rounds of tool calls in one turn; a model asking for more is stopped


@dataclass(frozen=True)
class AgentSpec:
    id: str
    name: str
    description: str
    backend: str
    model: str = ""
    system_prompt: str = ""
    context_tokens: int = 4096
    temperature: float = 0.7
    max_tokens: int | None = None  # answer cap sent to the provider (Anthropic needs one)
    vision: bool = False  # the model can be shown images
    tools: tuple[str, ...] = ()  # ids of the MCP servers this agent may use
    daily_tokens_per_user: int = 0  # each user's daily token quota with this agent; 0 = none


@dataclass(frozen=True)
class AccessSettings:
    mode: Literal["open", "allowlist", "approval"] = "open"
    allowed: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.admins

    def matches_allowlist(self, user_id: str) -> bool:
        return any(fnmatch.fnmatchcase(user_id, pattern) for pattern in self.allowed)


@dataclass(frozen=True)
class OnboardingSettings:
    on_invite: bool = True
    auto_start: bool = False


@dataclass(frozen=True)
class SpaceSettings:
    name_template: str = "{displayname}'s agents"
    first_room_title: str = "General"
    # auto: new working rooms are encrypted when the bot's client can encrypt; on: always
    # (a config error without crypto, see `check_encryption`); off: never.
    encryption: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class StreamingSettings:
    enabled: bool = True  # the default; `!ai stream on|off` decides per room
    first_post_ms: int = 1000  # the first post's deadline after the first words
    edit_interval_ms: int = 1000  # 0: every piece is shown at once, unpaced
    max_edit_interval_ms: int = 3000
    max_edits: int = 20


@dataclass(frozen=True)
class ReconciliationSettings:
    concurrency: int = 6
    on_start: bool = True
    interval_minutes: float = 0
    dry_run: bool = False
    catch_up_minutes: float = 1440


@dataclass(frozen=True)
class LimitSettings:
    max_message_chars: int = 8000
    per_user_requests_per_minute: int = 20
    daily_tokens_per_user: int = 0  # each user's daily token quota over all agents; 0 = none


@dataclass(frozen=True)
class Settings:
    command_prefix: str
    access: AccessSettings
    onboarding: OnboardingSettings
    spaces: SpaceSettings
    backends: dict[str, BackendSpec]
    agents: dict[str, AgentSpec]
    default_agent: str
    streaming: StreamingSettings
    reconciliation: ReconciliationSettings
    limits: LimitSettings
    mcp_servers: dict[str, McpServerSpec] = field(default_factory=dict)
    tools: ToolSettings = ToolSettings()
    media: MediaSettings = MediaSettings()
    speech: SpeechSettings = SpeechSettings()

    def agent(self, agent_id: str) -> AgentSpec | None:
        return self.agents.get(agent_id)

    def agent_or_default(self, agent_id: str) -> AgentSpec:
        """A room's agent; the default one when that agent left the config."""
        agent = self.agents.get(agent_id) or self.agents.get(self.default_agent)
        assert agent is not None  # config validation guarantees the default agent
        return agent

    def describe_changes(self, old: Settings) -> list[str]:
        """Top-level keys whose value differs from `old` (for the log; no values, so no secrets)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(old, f.name)]


def check_encryption(settings: Settings, can_encrypt: bool) -> None:
    """`spaces.encryption: on` needs a bot whose maubot client has end-to-end encryption."""
    if settings.spaces.encryption == "on" and not can_encrypt:
        raise ConfigError(
            "spaces.encryption",
            "is 'on' but this bot's maubot client has no end-to-end encryption (give the client "
            "a device id and install maubot[encryption]; see the README), or set it to 'auto'",
        )


def encrypt_new_rooms(settings: Settings, can_encrypt: bool) -> bool:
    return settings.spaces.encryption == "on" or (
        settings.spaces.encryption == "auto" and can_encrypt
    )


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping")
    return value


def _str(data: dict[str, Any], key: str, path: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string")
    return value


def _bool(data: dict[str, Any], key: str, path: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(path, "must be true or false")
    return value


def _number(
    data: dict[str, Any], key: str, path: str, default: float, *, minimum: float = 0
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if value < minimum:
        raise ConfigError(path, f"must be at least {minimum:g}")
    return value


def _int(data: dict[str, Any], key: str, path: str, default: int, *, minimum: int = 0) -> int:
    value = _number(data, key, path, default, minimum=minimum)
    if int(value) != value:
        raise ConfigError(path, "must be a whole number")
    return int(value)


def _ident(data: dict[str, Any], key: str, path: str) -> str:
    value = _str(data, key, path)
    if not _ID_RE.match(value):
        raise ConfigError(path, "must be a short id of letters, digits, '.', '_' or '-'")
    return value


def _str_list(data: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, "must be a list of strings")
    return tuple(value)


def _parse_access(data: dict[str, Any]) -> AccessSettings:
    section = _section(data, "access")
    mode = _str(section, "mode", "access.mode", "open")
    if mode not in ACCESS_MODES:
        raise ConfigError("access.mode", f"must be one of {', '.join(ACCESS_MODES)}")
    allowed = _str_list(section, "allowed", "access.allowed")
    for i, pattern in enumerate(allowed):
        if (
            not pattern.startswith("@")
            or ":" not in pattern
            or pattern.count("[") != pattern.count("]")
        ):
            raise ConfigError(
                f"access.allowed[{i}]",
                f"{pattern!r} is not a user id pattern like '@*:example.org'",
            )
    admins = _str_list(section, "admins", "access.admins")
    for i, admin in enumerate(admins):
        if not _MXID_RE.match(admin):
            raise ConfigError(f"access.admins[{i}]", f"{admin!r} is not a Matrix user id")
    return AccessSettings(mode=mode, allowed=allowed, admins=admins)  # type: ignore[arg-type]


def _entries(
    data: dict[str, Any], key: str, what: str
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, id, mapping) for each entry of a non-empty list section whose ids are unique."""
    items = data.get(key) or []
    if not isinstance(items, list) or not items:
        raise ConfigError(key, "must be a non-empty list")
    seen: set[str] = set()
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, "must be a mapping")
        item_id = _ident(item, "id", f"{path}.id")
        if item_id in seen:
            raise ConfigError(f"{path}.id", f"duplicate {what} id {item_id!r}")
        seen.add(item_id)
        yield path, item_id, item


def _parse_backends(data: dict[str, Any]) -> dict[str, BackendSpec]:
    backends: dict[str, BackendSpec] = {}
    for path, backend_id, item in _entries(data, "backends", "backend"):
        kind = _str(item, "type", f"{path}.type")
        if kind not in BACKEND_TYPES:
            raise ConfigError(
                f"{path}.type", f"unknown backend type {kind!r} (known: {', '.join(BACKEND_TYPES)})"
            )
        base_url = _str(item, "base_url", f"{path}.base_url")
        if kind == "anthropic" and not base_url:
            base_url = ANTHROPIC_BASE_URL
        if kind != "echo" and not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.base_url", f"an {kind} backend needs an http(s) base_url")
        api = _choice(item, "api", f"{path}.api", OPENAI_APIS, "chat")
        state = _choice(item, "state", f"{path}.state", CONVERSATION_STATES, "replay")
        if api != "chat" and kind != "openai":
            raise ConfigError(f"{path}.api", "only openai backends choose an api")
        if state == "server" and api != "responses":
            raise ConfigError(f"{path}.state", "'server' needs `api: responses`")
        backends[backend_id] = BackendSpec(
            id=backend_id,
            type=kind,  # type: ignore[arg-type]
            base_url=base_url.rstrip("/"),
            api_key=_str(item, "api_key", f"{path}.api_key"),
            timeout_s=_number(item, "timeout_s", f"{path}.timeout_s", 60, minimum=1),
            max_retries=_int(item, "max_retries", f"{path}.max_retries", 2),
            api=api,  # type: ignore[arg-type]
            state=state,  # type: ignore[arg-type]
        )
    return backends


def _choice(
    data: dict[str, Any], key: str, path: str, choices: tuple[str, ...], default: str
) -> str:
    value = _str(data, key, path, default) or default
    if value not in choices:
        raise ConfigError(path, f"must be one of {', '.join(choices)}")
    return value


def _parse_mcp_servers(data: dict[str, Any]) -> dict[str, McpServerSpec]:
    if not data.get("mcp_servers"):
        return {}
    servers: dict[str, McpServerSpec] = {}
    for path, server_id, item in _entries(data, "mcp_servers", "MCP server"):
        url = _str(item, "url", f"{path}.url")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.url", "must be the server's http(s) URL (streamable HTTP)")
        headers = item.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f"{path}.headers", "must map header names to strings")
        allow = _str_list(item, "allow", f"{path}.allow")
        if not allow:
            raise ConfigError(f"{path}.allow", "must list the tool names agents may call")
        servers[server_id] = McpServerSpec(
            id=server_id,
            url=url,
            allow=allow,
            headers=dict(headers),
            timeout_s=_number(item, "timeout_s", f"{path}.timeout_s", 30, minimum=1),
        )
    return servers


def _parse_agents(
    data: dict[str, Any],
    backends: dict[str, BackendSpec],
    mcp_servers: dict[str, McpServerSpec],
) -> dict[str, AgentSpec]:
    agents: dict[str, AgentSpec] = {}
    for path, agent_id, item in _entries(data, "agents", "agent"):
        backend = _str(item, "backend", f"{path}.backend")
        if backend not in backends:
            raise ConfigError(
                f"{path}.backend",
                f"agent {agent_id!r} names backend {backend!r}, which is not in `backends`",
            )
        tools = _str_list(item, "tools", f"{path}.tools")
        for i, server in enumerate(tools):
            if server not in mcp_servers:
                raise ConfigError(
                    f"{path}.tools[{i}]", f"{server!r} is not one of the `mcp_servers`"
                )
        if tools and backends[backend].type == "echo":
            raise ConfigError(f"{path}.tools", "the echo backend cannot call tools")
        max_tokens = item.get("max_tokens")
        agents[agent_id] = AgentSpec(
            id=agent_id,
            name=_str(item, "name", f"{path}.name") or agent_id,
            description=_str(item, "description", f"{path}.description"),
            backend=backend,
            model=_str(item, "model", f"{path}.model"),
            system_prompt=_str(item, "system_prompt", f"{path}.system_prompt"),
            context_tokens=_int(
                item, "context_tokens", f"{path}.context_tokens", 4096, minimum=256
            ),
            temperature=_number(item, "temperature", f"{path}.temperature", 0.7),
            max_tokens=None
            if max_tokens is None
            else _int(item, "max_tokens", f"{path}.max_tokens", 1024, minimum=1),
            tools=tools,
            vision=_bool(item, "vision", f"{path}.vision", False),
            daily_tokens_per_user=_int(
                item, "daily_tokens_per_user", f"{path}.daily_tokens_per_user", 0
            ),
        )
    return agents


def parse_settings(data: dict[str, Any]) -> Settings:
    """Validate the whole config; raise ConfigError naming the first bad key."""
    prefix = _str(data, "command_prefix", "command_prefix", "ai").strip()
    if not prefix or any(ch.isspace() for ch in prefix) or prefix.startswith("!"):
        raise ConfigError("command_prefix", "must be one word without spaces or '!', e.g. 'ai'")
    backends = _parse_backends(data)
    mcp_servers = _parse_mcp_servers(data)
    agents = _parse_agents(data, backends, mcp_servers)
    tools = _section(data, "tools")
    default_agent = _str(data, "default_agent", "default_agent")
    if default_agent not in agents:
        raise ConfigError(
            "default_agent", f"{default_agent!r} is not one of the agents ({', '.join(agents)})"
        )
    onboarding = _section(data, "onboarding")
    spaces = _section(data, "spaces")
    streaming = _section(data, "streaming")
    recon = _section(data, "reconciliation")
    limits = _section(data, "limits")
    name_template = _str(spaces, "name_template", "spaces.name_template", "{displayname}'s agents")
    encryption = spaces.get("encryption", "auto")
    if encryption is True or encryption is False:  # YAML reads a bare on/off as a boolean
        encryption = "on" if encryption else "off"
    if encryption not in ENCRYPTION_MODES:
        raise ConfigError("spaces.encryption", f"must be one of {', '.join(ENCRYPTION_MODES)}")
    try:
        name_template.format(displayname="x", localpart="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            "spaces.name_template", f"only {{displayname}} and {{localpart}} may be used ({e})"
        ) from None
    return Settings(
        command_prefix=prefix,
        access=_parse_access(data),
        onboarding=OnboardingSettings(
            on_invite=_bool(onboarding, "on_invite", "onboarding.on_invite", True),
            auto_start=_bool(onboarding, "auto_start", "onboarding.auto_start", False),
        ),
        spaces=SpaceSettings(
            name_template=name_template,
            first_room_title=_str(spaces, "first_room_title", "spaces.first_room_title", "General")
            or "General",
            encryption=encryption,
        ),
        backends=backends,
        agents=agents,
        default_agent=default_agent,
        streaming=StreamingSettings(
            enabled=_bool(streaming, "enabled", "streaming.enabled", True),
            first_post_ms=_int(streaming, "first_post_ms", "streaming.first_post_ms", 1000),
            edit_interval_ms=_int(streaming, "edit_interval_ms", "streaming.edit_interval_ms", 1000),
            max_edit_interval_ms=_int(
                streaming, "max_edit_interval_ms", "streaming.max_edit_interval_ms", 3000
            ),
            max_edits=_int(streaming, "max_edits", "streaming.max_edits", 20, minimum=1),
        ),
        reconciliation=ReconciliationSettings(
            concurrency=_int(recon, "concurrency", "reconciliation.concurrency", 6, minimum=1),
            on_start=_bool(recon, "on_start", "reconciliation.on_start", True),
            interval_minutes=_number(
                recon, "interval_minutes", "reconciliation.interval_minutes", 0
            ),
            dry_run=_bool(recon, "dry_run", "reconciliation.dry_run", False),
            catch_up_minutes=_number(
                recon, "catch_up_minutes", "reconciliation.catch_up_minutes", 1440
            ),
        ),
        limits=LimitSettings(
            max_message_chars=_int(
                limits, "max_message_chars", "limits.max_message_chars", 8000, minimum=1
            ),
            per_user_requests_per_minute=_int(
                limits,
                "per_user_requests_per_minute",
                "limits.per_user_requests_per_minute",
                20,
                minimum=1,
            ),
            daily_tokens_per_user=_int(
                limits, "daily_tokens_per_user", "limits.daily_tokens_per_user", 0
            ),
        ),
        mcp_servers=mcp_servers,
        tools=ToolSettings(max_steps=_int(tools, "max_steps", "tools.max_steps", 6, minimum=1)),
        media=_parse_media(_section(data, "media")),
        speech=_parse_speech(_section(data, "speech"), backends),
    )


def _parse_media(section: dict[str, Any]) -> MediaSettings:
    default = MediaSettings()
    types = _str_list(section, "image_types", "media.image_types") or default.image_types
    for i, mime in enumerate(types):
        if not mime.startswith("image/"):
            raise ConfigError(f"media.image_types[{i}]", f"{mime!r} is not an image MIME type")

    def size(key: str, value: int) -> int:
        return _int(section, key, f"media.{key}", value, minimum=1)

    return MediaSettings(
        image_types=types,
        max_image_bytes=size("max_image_bytes", default.max_image_bytes),
        max_file_bytes=size("max_file_bytes", default.max_file_bytes),
        max_file_chars=size("max_file_chars", default.max_file_chars),
        max_audio_bytes=size("max_audio_bytes", default.max_audio_bytes),
    )


def _parse_speech(section: dict[str, Any], backends: dict[str, BackendSpec]) -> SpeechSettings:
    default = SpeechSettings()
    for key in ("transcription_backend", "voice_backend"):
        backend = _str(section, key, f"speech.{key}")
        if backend and (backend not in backends or backends[backend].type != "openai"):
            raise ConfigError(
                f"speech.{key}", f"{backend!r} is not one of the `backends` of type openai"
            )
    return SpeechSettings(
        transcription_backend=_str(
            section, "transcription_backend", "speech.transcription_backend"
        ),
        transcription_model=_str(
            section,
            "transcription_model",
            "speech.transcription_model",
            default.transcription_model,
        )
        or default.transcription_model,
        voice_backend=_str(section, "voice_backend", "speech.voice_backend"),
        voice_model=_str(section, "voice_model", "speech.voice_model", default.voice_model)
        or default.voice_model,
        voice=_str(section, "voice", "speech.voice", default.voice) or default.voice,
    )
