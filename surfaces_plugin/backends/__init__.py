"""Agent backends behind one interface; `build_backend` picks the class for a config entry."""

from __future__ import annotations

from .anthropic import AnthropicBackend
from .base import (
    Backend,
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    ImagePart,
    ToolCall,
    ToolSpec,
    Usage,
    new_chat_id,
)
from .echo import EchoBackend
from .openai import OpenAIBackend
from .registry import BackendRegistry, build_backend
from .responses import ResponsesBackend
from .speech import Speech, SpokenAudio

__all__ = [
    "AnthropicBackend",
    "Backend",
    "BackendError",
    "BackendRegistry",
    "ChatMessage",
    "Chunk",
    "EchoBackend",
    "ErrorKind",
    "Features",
    "GenerationRequest",
    "ImagePart",
    "OpenAIBackend",
    "ResponsesBackend",
    "Speech",
    "SpokenAudio",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "build_backend",
    "new_chat_id",
]

