"""The one small interface every agent backend implements, and its typed error."""

from __future__ import annotations

import base64
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from ..config import BackendSpec

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A tool the model asks for: `id` pairs it with its result; `arguments` is a JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ImagePart:
    """An image the model is shown with a user message: the file's bytes and its MIME type."""

    mime: str
    data: bytes = field(repr=False)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    @property
    def data_url(self) -> str:
        """The image inline as an RFC 2397 data URL (how OpenAI-style APIs take it)."""
        return f"data:{self.mime};base64,{self.base64}"


@dataclass(frozen=True)
class ChatMessage:
    """One message of a request. An assistant message may ask for tools (`tool_calls`, with
    `content` the text said before them); a `tool` message answers the call `tool_call_id`."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    tool_name: str = ""  # role "tool": the called tool's name (some APIs want it back)
    is_error: bool = False  # role "tool": the call failed and `content` says why
    images: tuple[ImagePart, ...] = ()  # role "user": shown to an agent that can see


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model; `parameters` is the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: list[ChatMessage]
    temperature: float = 0.7
    max_tokens: int | None = None  # the answer's cap; None lets the provider decide (Anthropic needs one)
    tools: tuple[ToolSpec, ...] = ()
    # The room's platform_chat_id: a backend that keeps conversations on the platform continues
    # this one and sends only what it has not seen (the messages after the last assistant one).
    chat_id: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of answer text, the tool calls the model asks for (complete, once their arguments
    have streamed in; the answer then waits for their results), or the usage report."""

    text: str = ""
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Features:
    """What a backend can do; the dispatcher and commands ask this, never the backend's type."""

    streaming: bool = True
    tools: bool = False
    server_state: bool = False  # the platform holds the conversation (`platform_chat_id` is its id)


class ErrorKind(str, Enum):
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    BAD_REQUEST = "bad_request"
    SERVER = "server"
    MALFORMED = "malformed"
    UNREACHABLE = "unreachable"
    CHAT_GONE = "chat_gone"  # the platform no longer has the room's conversation


# Kinds worth another attempt when nothing was shown to the user yet.
RETRYABLE_KINDS = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.SERVER, ErrorKind.UNREACHABLE})


class BackendError(Exception):
    """A failed generation. `detail` is already free of secrets (backends redact before raising)."""

    def __init__(
        self,
        kind: ErrorKind,
        detail: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        self.timeout_s = timeout_s
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def user_message(self, agent_id: str, command_prefix: str = "ai") -> str:
        """One line for the room: which agent, what happened, what to do."""
        agent = f"The agent `{agent_id}`"
        retry = f"Send `!{command_prefix} retry` to try again"
        status = f" (HTTP {self.status})" if self.status else ""
        if self.kind is ErrorKind.AUTH:
            return f"{agent} was refused by its provider{status}: the API key was not accepted. An admin needs to fix the backend's `api_key`."
        if self.kind is ErrorKind.RATE_LIMITED:
            wait = (
                f" Wait {_seconds(self.retry_after)}, then"
                if self.retry_after
                else " Wait a moment, then"
            )
            return f"{agent} is rate limited by its provider.{wait} send `!{command_prefix} retry`."
        if self.kind is ErrorKind.TIMEOUT:
            within = f" within {_seconds(self.timeout_s)}" if self.timeout_s else " in time"
            return f"{agent} did not answer{within}. {retry}."
        if self.kind is ErrorKind.BAD_REQUEST:
            said = f": {self.detail}" if self.detail else ""
            if self.status == 404:  # usually a wrong model name or a base_url without /v1
                hint = "An admin should check the agent's `model` and the backend's `base_url`."
            else:
                hint = f"Check the agent's settings, or send `!{command_prefix} compact` if the conversation is too long."
            return f"{agent} rejected the request{status}{said}. {hint}"
        if self.kind is ErrorKind.SERVER:
            return (
                f"{agent} had a problem on the provider's side{status}. {retry} in a little while."
            )
        if self.kind is ErrorKind.CHAT_GONE:
            return f"{agent}'s provider no longer has this conversation. {retry}."
        if self.kind is ErrorKind.MALFORMED:
            return f"{agent} sent an answer that could not be read ({self.detail or 'unexpected response'}). {retry}."
        return f"{agent} could not be reached. {retry} later; if it keeps failing, an admin should check the backend's `base_url`."


def _seconds(value: float | None) -> str:
    return f"{value:.0f} s" if value and value >= 1 else "a second"


def new_chat_id(backend_id: str) -> str:
    """A fresh platform_chat_id: opaque and unique; the backend id prefix makes it readable."""
    return f"{backend_id}-{uuid.uuid4().hex}"


class Backend(ABC):
    """An agent provider. `stream` is an async generator; cancel the consuming task to stop it."""

    features = Features()

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec

    async def create_chat(self, seed: Sequence[ChatMessage] = ()) -> str:
        """A new conversation's platform_chat_id. A server-state backend creates it on the
        platform, holding `seed` (e.g. a summary or the room's history); others need no call."""
        return new_chat_id(self.spec.id)

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield answer text as it arrives, then at most one chunk of tool calls (when the model
        asks for tools: the dispatcher runs them and asks again) and at most one of usage."""

    async def complete(self, request: GenerationRequest) -> str:
        """The whole answer as one string (summaries, non-streamed replies)."""
        async with aclosing(self.stream(request)) as chunks:
            return "".join([chunk.text async for chunk in chunks])

    async def close(self) -> None:
        """Release what the backend owns (its own HTTP session, if any)."""
        return None  # nothing to release by default
