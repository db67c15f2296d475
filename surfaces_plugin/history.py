"""Conversation history: the turns of each chat (`platform_chat_id`), what was answered, resets.

History lives in the plugin database so the message path never re-reads the homeserver; when
the database lost it, it is rebuilt once from the room timeline (`timeline.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from . import layout
from .backends import BackendError, BackendRegistry, ChatMessage, Usage
from .clock import now_ms
from .commands import split_command
from .config import Settings
from .context_window import preamble
from .errors import Refusal
from .matrix import GatewayError, MatrixIO
from .rooms import RoomDirectory, WorkingRoom
from .store import Stores
from .store.chats import Chat
from .store.messages import DuplicateEventError, Message, Revision
from .timeline import ends_conversation, history_from_timeline, read_back
from .tokens import estimate_tokens
from .tool_runs import ToolRun

REBUILD_MAX_PAGES = 20  # up to 1000 events back when rebuilding a conversation's history
# A completion count far above the visible text's estimate includes hidden reasoning.
PLAUSIBLE_COMPLETION_FACTOR = 2.5


def not_created(agent_id: str, error: BackendError) -> str:
    """One line on why the provider did not open a new conversation (no secrets: see BackendError)."""
    status = f", HTTP {error.status}" if error.status else ""
    said = f": {error.detail}" if error.detail else ""
    return (
        f"The provider of `{agent_id}` did not create a new conversation "
        f"({error.kind.value}{status}{said})."
    )


class History:
    def __init__(
        self,
        io: MatrixIO,
        stores: Stores,
        rooms: RoomDirectory,
        backends: BackendRegistry,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.io = io
        self.stores = stores
        self.messages = stores.messages
        self.chats = stores.chats
        self.processed = stores.processed
        self.rooms = rooms
        self.backends = backends
        self.settings = settings
        self.log = log
        self._checked: set[str] = set()  # chats known to have their history cached
        self._rebuild_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # conversations

    async def start_chat(self, room: WorkingRoom) -> None:
        await self.chats.upsert(
            Chat(room.platform_chat_id, room.room_id, room.agent, created_ms=now_ms())
        )
        self._checked.add(room.platform_chat_id)  # a new chat has nothing to rebuild

    async def reset(self, room: WorkingRoom, handled: dict[str, Any] | None = None) -> WorkingRoom:
        """A fresh conversation in the room; the old one stays archived (cache and timeline).

        `handled`: keys to merge into the reset notice (the `!ai reset` it carries out)."""
        settings = self.settings()
        agent = settings.agent_or_default(room.agent)
        old_id = room.platform_chat_id
        try:
            new_id = await self.backends.for_agent(agent).create_chat()
        except BackendError as e:  # nothing changed: the current conversation goes on
            self.log.warning("No new conversation for %s from %s: %s", room.room_id, agent.id, e)
            raise Refusal(
                f"{not_created(agent.id, e)} This conversation stays current; "
                f"send `!{settings.command_prefix} reset` again later."
            ) from e
        updated = await self.rooms.update_binding(room, platform_chat_id=new_id)
        if await self.chats.get(old_id) is not None:
            await self.chats.set_archived(old_id)
        else:  # the cache lost it: keep a row so the old conversation stays findable
            await self.chats.upsert(
                Chat(old_id, room.room_id, room.agent, created_ms=now_ms(), archived=True)
            )
        await self.start_chat(updated)
        await self.io.send_notice(
            room.room_id,
            f"Started a fresh conversation with `{agent.id}`: it does not see the messages above. "
            f"The earlier conversation stays archived "
            f"(`!{settings.command_prefix} export` exports the current one).",
            {**layout.reset_marker(new_id), **(handled or {})},
        )
        return updated

    async def replace_chat(self, room: WorkingRoom, seed: Sequence[ChatMessage]) -> WorkingRoom:
        """The room's conversation goes on in a new platform conversation holding `seed`.

        Raises BackendError when the platform refuses (then nothing changed).
        """
        room = self.rooms.current(room)
        agent = self.settings().agent_or_default(room.agent)
        new_id = await self.backends.for_agent(agent).create_chat(seed)
        return await self.switch_chat(room, new_id)

    async def switch_chat(
        self, room: WorkingRoom, new_id: str, **binding_changes: Any
    ) -> WorkingRoom:
        """Bind the room to `new_id` (Matrix first, in one state event with `binding_changes`)
        and move the conversation's turns there, so `!ai context` and the export still show
        them; unlike a reset, nothing is archived."""
        room = self.rooms.current(room)
        old_id = room.platform_chat_id
        updated = await self.rooms.update_binding(room, platform_chat_id=new_id, **binding_changes)
        if await self.chats.get(old_id) is None:
            await self.start_chat(updated)
        await self.stores.move_chat(old_id, new_id)
        self._checked.add(new_id)  # its history is the moved one: nothing to rebuild
        self.log.info("Conversation %s of %s goes on as %s", old_id, room.room_id, new_id)
        return updated

    # turns and what was answered

    async def is_answered(self, room: WorkingRoom, event_id: str, ts: int) -> bool:
        """Answered already: at or before the room's processed mark (answers go in order)."""
        mark = await self.processed.get(room.room_id)
        return mark is not None and (mark.event_id == event_id or mark.ts > ts)

    async def mark_processed(self, room: WorkingRoom, event_id: str, ts: int) -> None:
        await self.processed.mark(room.room_id, event_id, ts)

    async def add_user_turn(
        self,
        room: WorkingRoom,
        event_id: str,
        sender: str,
        body: str,
        ts: int,
        attachment: layout.Attachment | None = None,
    ) -> None:
        room = self.rooms.current(room)
        await self.ensure(room, until_event_id=event_id)
        try:
            await self.messages.append(
                room.platform_chat_id,
                "user",
                body,
                event_id=event_id,
                sender=sender,
                ts=ts,
                attachment=attachment,
            )
        except DuplicateEventError:
            pass  # stored before a crash (or just rebuilt); answer it without storing it twice
        await self.rooms.touch(room)

    async def add_answer(
        self, room: WorkingRoom, text: str, event_id: str, usage: Usage | None
    ) -> None:
        room = self.rooms.current(room)
        tokens = usage.completion_tokens if usage is not None else None
        if tokens is not None and tokens > estimate_tokens(text) * PLAUSIBLE_COMPLETION_FACTOR + 16:
            tokens = None  # the count includes reasoning that is not sent back
        try:
            await self.messages.append(
                room.platform_chat_id,
                "assistant",
                text,
                event_id=event_id,
                sender=self.io.bot_id,
                tokens=tokens,
            )
        except DuplicateEventError:
            pass
        if usage is not None and usage.prompt_tokens:
            await self.chats.set_prompt_tokens(room.platform_chat_id, usage.prompt_tokens)

    async def add_tool_run(self, room: WorkingRoom, run: ToolRun, event_id: str | None) -> None:
        """A turn's tool calls and results, stored before its answer (`event_id`: the notice)."""
        if not run.steps:
            return
        try:
            await self.messages.append(
                room.platform_chat_id,
                "tools",
                run.dumps(),
                event_id=event_id,
                sender=self.io.bot_id,
            )
        except DuplicateEventError:
            pass

    async def forget_user_turn(self, room: WorkingRoom, event_id: str) -> int:
        """The owner redacted `event_id`: later requests no longer carry it. Returns rows removed.

        A summary written before the redaction stays as it is (it is the agent's own words).
        """
        room = self.rooms.current(room)
        # Its answers go too: they usually quote the retracted text.
        removed = await self.messages.delete_user_turn(room.platform_chat_id, event_id)
        if removed:
            self.log.info("Removed the redacted %s and its answers from %s", event_id, room.room_id)
        return removed

    async def revise_last_turn(
        self, room: WorkingRoom, event_id: str, body: str
    ) -> Revision | None:
        """The owner's last message `event_id` now says `body` and its stored answer is gone (a
        regenerated one replaces it); None, and nothing changed, when it is not their last."""
        room = self.rooms.current(room)
        await self.ensure(room)
        return await self.messages.revise_last_user_turn(room.platform_chat_id, event_id, body)

    async def turn_answered_by(self, room: WorkingRoom, answer_event_id: str) -> Message | None:
        """The user message that the stored answer `answer_event_id` answers."""
        room = self.rooms.current(room)
        await self.ensure(room)
        return await self.messages.user_turn_answered_by(room.platform_chat_id, answer_event_id)

    async def last_user_turn(self, room: WorkingRoom) -> Message | None:
        room = self.rooms.current(room)
        return await self.messages.last_user_message(room.platform_chat_id)

    async def turns(
        self, room: WorkingRoom, upto_seq: int | None = None
    ) -> tuple[Chat | None, list[Message]]:
        """The chat row and its turns after the summary (up to `upto_seq`, for a retry)."""
        room = self.rooms.current(room)
        await self.ensure(room)
        chat = await self.chats.get(room.platform_chat_id)
        after = chat.summary_upto_seq if chat is not None and chat.summary else None
        history = await self.messages.history(room.platform_chat_id, after_seq=after)
        return chat, [m for m in history if upto_seq is None or m.seq <= upto_seq]

    async def chat(self, room: WorkingRoom) -> Chat | None:
        room = self.rooms.current(room)
        return await self.chats.get(room.platform_chat_id)

    async def all_turns(self, room: WorkingRoom) -> tuple[Chat | None, list[Message]]:
        """Every stored turn of the current chat, the summarised ones too (for an export)."""
        room = self.rooms.current(room)
        await self.ensure(room)
        chat = await self.chats.get(room.platform_chat_id)
        return chat, await self.messages.history(room.platform_chat_id)

    async def count(self, platform_chat_id: str, upto_seq: int | None = None) -> int:
        """How many messages the chat stores (up to `upto_seq` when given)."""
        total = await self.messages.count(platform_chat_id)
        if upto_seq is None:
            return total
        return total - await self.messages.count(platform_chat_id, after_seq=upto_seq)

    async def set_summary(self, room: WorkingRoom, summary: str, upto_seq: int) -> None:
        room = self.rooms.current(room)
        if await self.chats.get(room.platform_chat_id) is None:
            await self.start_chat(room)
        await self.chats.set_summary(room.platform_chat_id, summary, upto_seq)

    # history rebuilt from the timeline, when the cache lost it

    async def ensure(self, room: WorkingRoom, until_event_id: str | None = None) -> int:
        """Rebuild the current chat's history from the room timeline once, if none is cached.

        `until_event_id` (the message being answered) drops what the owner sent after it: those
        messages are stored when their own turn comes. Returns the number of messages stored.
        """
        room = self.rooms.current(room)
        pcid = room.platform_chat_id
        if pcid in self._checked:
            return 0
        async with self._rebuild_locks[pcid]:
            if pcid in self._checked:
                return 0
            if await self.messages.count(pcid) > 0:
                self._checked.add(pcid)
                return 0
            try:
                stored = await self._rebuild(room, until_event_id)
            except GatewayError as e:  # answer without history now; try again next time
                self.log.warning("Could not rebuild the history of %s: %s", room.room_id, e)
                return 0
            self._checked.add(pcid)
            return stored

    async def _rebuild(self, room: WorkingRoom, until_event_id: str | None) -> int:
        pcid = room.platform_chat_id
        bot = self.io.bot_id
        events = await read_back(
            self.io,
            room.room_id,
            stop=lambda chunk: any(ends_conversation(e, bot, pcid) for e in chunk),
            max_pages=REBUILD_MAX_PAGES,
        )
        prefix = self.settings().command_prefix
        history = history_from_timeline(
            events,
            owner=room.owner,
            bot_id=bot,
            platform_chat_id=pcid,
            is_command=lambda body: split_command(body, prefix) is not None,
        )
        turns = history.turns
        ids = [t.event_id for t in turns]
        if until_event_id in ids:
            turns = turns[: ids.index(until_event_id) + 1]
        if await self.chats.get(pcid) is None:
            await self.start_chat(room)
        seqs: dict[str, int] = {}
        for turn in turns:
            try:
                seqs[turn.event_id] = await self.messages.append(
                    pcid,
                    turn.role,
                    turn.content,
                    event_id=turn.event_id,
                    sender=turn.sender,
                    ts=turn.ts,
                    attachment=turn.attachment,
                )
            except DuplicateEventError:
                continue
        if history.summary:
            # A summary of events older than what was read back covers none of the stored ones.
            upto = seqs.get(history.summary_upto_event_id or "", 0)
            await self.chats.set_summary(pcid, history.summary, upto)
        if turns or history.summary:
            self.log.info(
                "Rebuilt %d messages of %s in %s from the timeline", len(seqs), pcid, room.room_id
            )
        return len(seqs)


async def stored_seed(stores: Stores, platform_chat_id: str, room_id: str) -> list[ChatMessage]:
    """The cached conversation as messages (its summary first) to seed a platform conversation;
    empty when the cache does not hold it for this room."""
    chat = await stores.chats.get(platform_chat_id)
    if chat is None or chat.room_id != room_id:
        return []
    after = chat.summary_upto_seq if chat.summary else None
    turns = await stores.messages.history(platform_chat_id, after_seq=after)
    seed = [ChatMessage("system", preamble("", (), chat.summary))] if chat.summary else []
    return seed + [ChatMessage(m.role, m.content) for m in turns]
