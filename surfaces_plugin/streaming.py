"""How an answer appears in the room: the typing notice, then one message posted and edited.

A fast answer is one message and shows no typing notice; a slow one is posted at its first
complete sentence (or a short deadline after its first words) and edited as it grows, at
sentence ends, ever less often (`pacing.py`). Every ending (finished, cancelled, failed) leaves
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
from . import txn as txns
from .config import Settings
from .matrix import GatewayError, MatrixIO
from .pacing import Pace, Pacer

TYPING_REFRESH_S = 20.0
TYPING_DELAY_S = 0.3  # answers faster than this show no typing notice (two requests saved)
CANCELLED_MARK = "\n\n*(cancelled)*"
_ENDING_ROOM = "x" * 160  # longer than any mark appended to an answer that was already shown


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
    """One answer in the room: posted and edited as it grows, paced by `pacing.Pacer`.

    A pump task shows the answer while the agent writes it, so a slow homeserver never holds up
    the stream; every ending (finished, cancelled, failed) stops the pump after its send in
    flight, then sends the last text once. While streaming, the answer's marker carries
    `partial: true` and MSC4357's live key; the ending drops both, so an answer cut off by a
    crash stays recognisable. An answer too long for one event continues in a new message: the
    full one is finished (without `partial`) at a natural break, and every part names the
    message it answers.
    """

    def __init__(
        self,
        io: MatrixIO,
        settings: Callable[[], Settings],
        room_id: str,
        marker: layout.TurnMarker,
        txn: Callable[[str], str | None] = lambda label: None,
        replaces: EventID | None = None,
        *,
        streaming: bool = True,  # the room's choice (`WorkingRoom.streams`): edit as it grows
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.io = io
        self.txn = txn  # part label → the transaction id of that send (`Job.txn`)
        self.settings = settings
        self.room_id = room_id
        self.turn = marker
        self.streaming = streaming
        self.clock = clock
        self.text = ""  # the current message's text (earlier, full messages are in `_done`)
        # A regenerated answer takes the place of the previous one: it edits that message.
        self.replaces = replaces
        self.event_id: EventID | None = replaces  # the current message, once posted
        self.first_event_id: EventID | None = replaces  # the answer's first message
        self._done: list[str] = []  # the texts of earlier, full messages
        self._part_ids: list[EventID] = []  # and their event ids
        self._shown = ""
        self._shown_partial = False
        self._edits = 0  # partial edits of the current message
        self._pacer = Pacer(Pace.of(settings().streaming))
        self._pump: asyncio.Task[None] | None = None
        self._more = asyncio.Event()  # new text, or the end: the pump looks again
        self._closing = False
        self._broken: Exception | None = None  # a send of the pump failed: the answer ends

    @property
    def full_text(self) -> str:
        """Everything the answer said so far, over all its messages."""
        return "".join(self._done) + self.text

    @property
    def posted(self) -> tuple[EventID, ...]:
        """The messages of this answer in the room so far."""
        return (*self._part_ids, *([self.event_id] if self.event_id else []))

    async def add(self, text: str) -> None:
        if self._broken is not None:
            raise self._broken
        self.text += text
        if not self.streaming:
            return
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump(), name="streamed answer")
        self._more.set()

    async def _run_pump(self) -> None:
        try:
            while not self._closing:
                self._more.clear()
                step = self._pacer.step(self.text, len(self._shown), self.clock())
                if step.show is None:
                    try:
                        await asyncio.wait_for(self._more.wait(), step.wait)
                    except asyncio.TimeoutError:
                        pass
                    continue
                started = self.clock()
                await self._show(self.text[: step.show], partial=True)
                self._pacer.sent(started, self.clock())
        except Exception as e:  # raised by the next `add` or the ending, which end the answer
            self._broken = e

    async def _stop_pump(self) -> None:
        """No more partial sends: the one in flight completes first, so the ending lands last."""
        self._closing = True
        self._more.set()
        if self._pump is not None:
            await asyncio.shield(self._pump)

    async def finish(self) -> None:
        await self._stop_pump()
        if self._broken is not None:
            raise self._broken
        if not self.full_text.strip():
            self.text = "*(the agent sent an empty answer)*"
        else:
            self.text = self.text.strip() if not self._done else self.text.rstrip()
        if self.text and (self.event_id is None or self.text != self._shown or self._shown_partial):
            await self._show(self.text)

    async def cancelled(self, mark: str = CANCELLED_MARK) -> None:
        await self._stop_pump()
        if self.full_text.strip():
            await self._show(self.text + mark)
        elif self.replaces:  # the previous answer's text must not stay as if it were this one's
            await self._show(mark.strip())
        elif mark == CANCELLED_MARK:
            handled = layout.command_marker(self.turn.command) if self.turn.command else None
            await self.io.send_notice(
                self.room_id,
                "Cancelled before the agent said anything.",
                handled,
                txn=self.txn("cancelled"),
            )

    async def failed(self, message: str) -> None:
        await self._stop_pump()
        if self.full_text.strip() or self.replaces:
            await self._show(self.text + "\n\n*(the answer stopped here)*")
        await self.io.send_notice(self.room_id, message, txn=self.txn("failed"))

    async def withdraw(self, text: str) -> None:
        """Replace every message of the answer posted so far with `text` (no `partial`)."""
        await self._stop_pump()
        for event_id in [*self._part_ids, *([self.event_id] if self.event_id else [])]:
            content = self._content(text, partial=False)
            await self.io.edit(self.room_id, event_id, content, self._final_txn(event_id, content))

    def _marker(self, partial: bool) -> dict[str, Any]:
        t = self.turn
        continues = self._part_ids[-1] if self._part_ids else None
        return layout.turn_marker(
            t.platform_chat_id,
            t.agent,
            answers=t.answers,
            partial=partial,
            continues=continues,
            command=t.command,
            usage=t.usage,
            revision=t.revision,
        )

    def _fits(self, text: str) -> bool:
        # Room kept for an ending appended later (cancelled, interrupted by a restart, stopped).
        return replies.answer_fits(text + _ENDING_ROOM, self._marker(partial=True))

    async def _show(self, text: str, partial: bool = False) -> None:
        """The current message shows `text` (a prefix of `self.text` while streaming, or the
        ending's text); what does not fit in it goes on in new messages."""
        *full, rest = replies.split_to_fit(text, self._fits)
        for part in full:
            await self._put(part, partial=False)
            self._done.append(part)
            assert self.event_id is not None
            self._part_ids.append(self.event_id)
            self.event_id, self._shown, self._shown_partial = None, "", False
            self.text = self.text[len(part) :]  # sliced after the send: keeps what came meanwhile
        if not partial:
            self.text = rest  # an ending: nothing comes after it
        await self._put(rest, partial)

    def _content(self, text: str, partial: bool) -> dict[str, Any]:
        live = layout.live_marker() if partial else {}
        return replies.rendered(text, "m.text", {**self._marker(partial), **live})

    def _final_txn(self, event_id: str, content: dict[str, Any]) -> str | None:
        edits = self._edits if event_id == self.event_id else 0
        return self.txn(f"final {event_id} {edits} {txns.content_label(content)}")

    async def _put(self, text: str, partial: bool) -> None:
        """Post the current message, or edit it when it was posted already.

        Transaction ids: a post is keyed by its part number, so an answer sent again after a
        crash reuses its message; partial edits are numbered; a final edit is keyed by its
        content and the number of partial edits before it, so resending the same answer the
        same way is deduplicated, while a final edit after a partial one the first run never
        sent (or with another text) lands and is what the message shows.
        """
        content = self._content(text, partial)
        if self.event_id is None:
            txn = self.txn(f"post {len(self._part_ids)}")
            self.event_id = await self.io.send_content(self.room_id, content, txn)
            self.first_event_id = self.first_event_id or self.event_id
            self._edits = 0
        elif partial:
            self._edits += 1
            txn = self.txn(f"edit {self.event_id} {self._edits}")
            await self.io.edit(self.room_id, self.event_id, content, txn)
        else:
            await self.io.edit(
                self.room_id, self.event_id, content, self._final_txn(self.event_id, content)
            )
        self._shown, self._shown_partial = text, partial
