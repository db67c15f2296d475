"""The live backend instances behind the agent registry; rebuilt when their config changes."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from ..config import AgentSpec, BackendSpec, Settings
from .anthropic import AnthropicBackend
from .base import Backend
from .echo import EchoBackend
from .openai import OpenAIBackend
from .responses import ResponsesBackend
from .speech import Speech


def build_backend(spec: BackendSpec, http: aiohttp.ClientSession | None = None) -> Backend:
    """`http` is shared (the plugin's session) when given; otherwise the backend makes its own."""
    if spec.type == "echo":
        return EchoBackend(spec)
    if spec.type == "openai" and spec.api == "responses":
        return ResponsesBackend(spec, http)
    if spec.type == "openai":
        return OpenAIBackend(spec, http)
    if spec.type == "anthropic":
        return AnthropicBackend(spec, http)
    raise ValueError(f"unknown backend type {spec.type!r}")


class BackendRegistry:
    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.log = log
        self._backends: dict[str, Backend] = {}
        self._specs: dict[str, BackendSpec] = {}
        self._speech: dict[str, Speech] = {}
        self._retired: list[Backend | Speech] = []
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Keep backends whose spec is unchanged; rebuild the rest (answers in flight finish)."""
        fresh: dict[str, Backend] = {}
        for backend_id, spec in settings.backends.items():
            current = self._backends.get(backend_id)
            fresh[backend_id] = current if current and current.spec == spec else build_backend(spec)
        self._retired += [b for b in self._backends.values() if b not in fresh.values()]
        self._backends = fresh
        self._specs = dict(settings.backends)
        stale = [i for i, s in self._speech.items() if self._specs.get(i) != s.spec]
        self._retired += [self._speech.pop(backend_id) for backend_id in stale]

    def speech(self, backend_id: str) -> Speech:
        """The speech client of an `openai` backend (made when first asked for); KeyError for
        an id the config does not have, ValueError for a backend of another type."""
        client = self._speech.get(backend_id)
        if client is None:
            spec = self._specs[backend_id]
            if spec.type != "openai":
                raise ValueError(f"backend {backend_id!r} is not of type openai: it has no speech")
            client = self._speech[backend_id] = Speech(spec, log=self.log)
        return client

    def put(self, backend: Backend) -> None:
        """Serve `backend` for its spec's id (how tests install a scripted backend)."""
        self._backends[backend.spec.id] = backend

    def for_agent(self, agent: AgentSpec) -> Backend:
        return self._backends[agent.backend]

    def specs(self) -> list[BackendSpec]:
        return [backend.spec for backend in self._backends.values()]

    async def close(self) -> None:
        backends = [*self._backends.values(), *self._speech.values(), *self._retired]
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)
