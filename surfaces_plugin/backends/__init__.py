"""Agent backends behind one interface; `build_backend` picks the class for a config entry."""

from __future__ import annotations

import aiohttp

from ..config import BackendSpec
from .base import (
    Backend,
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    GenerationRequest,
    Usage,
)
from .echo import EchoBackend
from .openai import OpenAIBackend

__all__ = [
    "Backend",
    "BackendError",
    "ChatMessage",
    "Chunk",
    "EchoBackend",
    "ErrorKind",
    "GenerationRequest",
    "OpenAIBackend",
    "Usage",
    "build_backend",
]


def build_backend(spec: BackendSpec, http: aiohttp.ClientSession | None = None) -> Backend:
    """`http` is shared (the plugin's session) when given; otherwise the backend makes its own."""
    if spec.type == "echo":
        return EchoBackend(spec)
    if spec.type == "openai":
        return OpenAIBackend(spec, http)
    raise ValueError(f"unknown backend type {spec.type!r}")
