"""How an answer appears in the room: the typing notice, then one message posted and edited.

A fast answer is one message and shows no typing notice; a slow one is posted once the edit
interval has passed and edited as it grows. Every ending (finished, cancelled, failed) leaves
the message without the `partial` marker, so one cut off by a crash is recognisable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mautrix.types import EventID

from . import layout, replies
from .config import Settings
from .matrix import GatewayError, MatrixIO

TYPING_REFRESH_S = 20.0
TYPING_DELAY_S = 0.3  # answers faster than this show no typing notice (two requests saved)
CANCELLED_MARK = "\n\n*(cancelled)*"


class Typing:
    """The typing notice, shown only when an answer takes a while (fast ones need none)."""

    def __init__(self, io: MatrixIO, room_id: str, log: logging.Logger) -> None:
        self.io = io
        self.room_id = room_id
        self.log = log
        self.shown = False
        self._task = io.spawn(self._run(), name="typing")

    async def _run(self) -> None:
        await asyncio.sleep(TYPING_DELAY_S)
        while True:
            self.shown = True
            await self.io.set_typing(self.room_id, int(TYPING_REFRESH_S * 1500))
            await asyncio.sleep(TYPING_REFRESH_S)

    async def stop(self) -> None:
        self._task.cancel()
        if not self.shown:
            return
        self.shown = False
        try:
            await self.io.set_typing(self.room_id, 0)
        except GatewayError as e:  # typing is cosmetic; never fail an answer for it
            self.log.debug("Could not stop the typing notice in %s: %s", self.room_id, e)


class StreamedReply:
    """One answer in the room: posted at the first chunk, then edited at most every interval.

    While streaming, the answer's marker carries `partial: true`; every ending (finished,
    cancelled, failed) edits it without, so an answer cut off by a crash stays recognisable.
    """

    def __init__(
        self,
        io: MatrixIO,
        settings: Callable[[], Settings],
        room_id: str,
        marker: layout.TurnMarker,
    ) -> None:
        self.io = io
        self.settings = settings
        self.room_id = room_id
        self.marker = layout.turn_marker(marker.platform_chat_id, marker.agent, answers=marker.answers)
        self.partial_marker = layout.turn_marker(
            marker.platform_chat_id, marker.agent, answers=marker.answers, partial=True
        )
        self.text = ""
        self.event_id: EventID | None = None
        self._shown = ""
        self._shown_partial = False
        self._last_edit = time.monotonic()  # the first post also waits one interval

    async def add(self, text: str) -> None:
        self.text += text
        streaming = self.settings().streaming
        if not streaming.enabled:
            return
        if time.monotonic() - self._last_edit < streaming.edit_interval_ms / 1000:
            return  # an answer that ends within the interval is sent once, not posted and edited
        if self.event_id is None:
            await self._post(self.text, partial=True)
        else:
            await self._edit(self.text, partial=True)

    async def finish(self) -> None:
        final = self.text.strip() or "*(the agent sent an empty answer)*"
        if self.event_id is None:
            await self._post(final)
        elif final != self._shown or self._shown_partial:
            await self._edit(final)
        self.text = final

    async def cancelled(self, mark: str = CANCELLED_MARK) -> None:
        if self.text.strip():
            await self._show(self.text + mark)
        elif mark == CANCELLED_MARK:
            await self.io.send_notice(self.room_id, "Cancelled before the agent said anything.")

    async def failed(self, message: str) -> None:
        if self.text.strip():
            await self._show(self.text + "\n\n*(the answer stopped here)*")
        await self.io.send_notice(self.room_id, message)

    async def _show(self, text: str) -> None:
        """The final text of an ended answer, whether it was posted already or still buffered."""
        if self.event_id is None:
            await self._post(text)
        else:
            await self._edit(text)

    def _content(self, text: str, partial: bool) -> dict[str, Any]:
        return replies.rendered(text, "m.text", self.partial_marker if partial else self.marker)

    async def _post(self, text: str, partial: bool = False) -> None:
        self.event_id = await self.io.send_content(self.room_id, self._content(text, partial))
        self._shown, self._shown_partial = text, partial
        self._last_edit = time.monotonic()

    async def _edit(self, text: str, partial: bool = False) -> None:
        assert self.event_id is not None
        await self.io.edit(self.room_id, self.event_id, self._content(text, partial))
        self._shown, self._shown_partial = text, partial
        self._last_edit = time.monotonic()
