"""Shared memory: notes a user shares with all their working rooms (`!ai memory`).

The notes live in the user's Space as `org.surfaces.memory` state (Matrix is the truth); the
plugin database keeps a copy so the message path reads them without a homeserver call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from mautrix.types import RoomID

from . import layout
from .config import Settings
from .errors import Refusal, UsageError
from .matrix import MatrixIO, NotFound
from .store.memory import MemoryStore
from .store.users import UserStore

MAX_NOTES = 20
MAX_NOTE_CHARS = 500


class MemoryService:
    def __init__(
        self,
        io: MatrixIO,
        cache: MemoryStore,
        users: UserStore,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.io = io
        self.cache = cache
        self.users = users
        self.settings = settings
        self.log = log
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def notes(self, user_id: str) -> tuple[str, ...]:
        """The notes for a request: from the cache, read from the Space once if never cached."""
        cached = await self.cache.get(user_id)
        if cached is not None:
            return cached.notes
        space_id = await self._space_of(user_id)
        if space_id is None:
            return ()
        try:
            memory = await self._read(space_id)
        except Exception as e:  # the answer goes on without notes rather than failing
            self.log.warning("Could not read the memory of %s: %s", user_id, e)
            return ()
        await self.cache.set(user_id, memory.notes)
        return memory.notes

    async def current(self, user_id: str) -> tuple[str, ...]:
        """The notes as the Space holds them now (refreshes the cache)."""
        space_id = await self._space(user_id)
        memory = await self._read(space_id)
        await self.cache.set(user_id, memory.notes)
        return memory.notes

    async def add(self, user_id: str, text: str) -> int:
        """Add a note; returns its number (1-based)."""
        text = " ".join(text.split())  # one line: notes are listed one per line
        if not text:
            raise UsageError("What should I remember?")
        if len(text) > MAX_NOTE_CHARS:
            raise UsageError(
                f"That note has {len(text)} characters; the limit is {MAX_NOTE_CHARS}."
            )
        async with self._locks[user_id]:
            space_id = await self._space(user_id)
            notes = (await self._read(space_id)).notes
            if len(notes) >= MAX_NOTES:
                raise Refusal(
                    f"You already have {len(notes)} notes, the most I keep. "
                    f"Forget one first with `!{self._prefix} memory forget <n>`."
                )
            await self._write(user_id, space_id, notes + (text,))
            return len(notes) + 1

    async def forget(self, user_id: str, number: str) -> str:
        """Remove note `number` (1-based, as listed); returns the removed text."""
        if not number.isdigit():
            raise UsageError(
                f"`{number}` is not a note number; `!{self._prefix} memory` lists them."
            )
        async with self._locks[user_id]:
            space_id = await self._space(user_id)
            notes = (await self._read(space_id)).notes
            index = int(number)
            if not notes:
                raise Refusal("You have no notes to forget.")
            if not 1 <= index <= len(notes):
                raise UsageError(
                    f"There is no note {index}; you have {len(notes)} (numbers 1 to {len(notes)})."
                )
            removed = notes[index - 1]
            await self._write(user_id, space_id, notes[: index - 1] + notes[index:])
            return removed

    # Matrix

    @property
    def _prefix(self) -> str:
        return self.settings().command_prefix

    async def _space_of(self, user_id: str) -> str | None:
        user = await self.users.get(user_id)
        return user.space_id if user is not None and user.space_id else None

    async def _space(self, user_id: str) -> str:
        space_id = await self._space_of(user_id)
        if space_id is None:
            raise Refusal(
                f"Shared memory lives in your Space, and you have none yet. "
                f"Send `!{self._prefix} start` first."
            )
        return space_id

    async def _read(self, space_id: str) -> layout.Memory:
        try:
            client = self.io.client
            content = await self.io.gateway.read(
                "read your shared memory",
                lambda: client.get_state_event(RoomID(space_id), layout.MEMORY, ""),
            )
        except NotFound:
            return layout.Memory()
        raw = content.serialize() if hasattr(content, "serialize") else content
        memory = layout.parse_memory(raw)
        if memory is None:
            self.log.warning("Ignoring malformed %s in %s", layout.MEMORY_TYPE, space_id)
            return layout.Memory()
        return memory

    async def _write(self, user_id: str, space_id: str, notes: tuple[str, ...]) -> None:
        content = layout.Memory(notes=notes).to_content()
        await self.io.send_state("save your shared memory", space_id, layout.MEMORY, content)
        await self.cache.set(user_id, notes)
