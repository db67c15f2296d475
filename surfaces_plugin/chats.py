"""Chat bindings: which working room talks to which conversation (`platform_chat_id`) and agent.

The room → chat map lives in memory (rebuilt by reconciliation, saved in the cache) so the
message path needs no database or homeserver lookup to route a message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mautrix.types import RoomID

from . import layout
from .backends import ChatMessage, GenerationRequest, Usage
from .commands import split_command
from .compaction import summarise
from .config import AgentSpec
from .context_window import (
    Turn,
    Window,
    assemble,
    compaction_split,
    estimate_tokens,
    keep_tokens_after_compaction,
    message_tokens,
    preamble,
)
from .matrix import GatewayError
from .store.chats import Chat
from .store.messages import DuplicateEventError, Message
from .store.rooms import Room as RoomRow
from .timeline import ends_conversation, history_from_timeline, read_back, summary_notice_text

if TYPE_CHECKING:
    from .app import Surfaces


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class WorkingRoom:
    room_id: str
    owner: str
    space_id: str
    agent: str
    title: str
    platform_chat_id: str
    system_prompt: str | None = None
    archived: bool = False
    order_key: str = ""
    last_activity_ms: int | None = None

    def binding(self) -> layout.Binding:
        return layout.Binding(
            owner=self.owner,
            space_id=self.space_id,
            agent=self.agent,
            platform_chat_id=self.platform_chat_id,
            title=self.title,
            system_prompt=self.system_prompt,
            archived=self.archived,
        )

    def last_activity_text(self) -> str:
        if not self.last_activity_ms:
            return "never"
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.last_activity_ms / 1000))

    def to_row(self) -> RoomRow:
        return RoomRow(
            room_id=self.room_id,
            kind="working",
            owner=self.owner,
            space_id=self.space_id,
            agent=self.agent,
            title=self.title,
            platform_chat_id=self.platform_chat_id,
            system_prompt=self.system_prompt,
            archived=self.archived,
            order_key=self.order_key,
            last_activity_ms=self.last_activity_ms,
        )

    @classmethod
    def from_row(cls, row: RoomRow) -> WorkingRoom:
        return cls(
            room_id=row.room_id,
            owner=row.owner,
            space_id=row.space_id or "",
            agent=row.agent or "",
            title=row.title or "",
            platform_chat_id=row.platform_chat_id or "",
            system_prompt=row.system_prompt,
            archived=row.archived,
            order_key=row.order_key or "",
            last_activity_ms=row.last_activity_ms,
        )


REBUILD_MAX_PAGES = 20  # up to 1000 events back when rebuilding a conversation's history
SCALE_BOUNDS = (0.5, 2.0)  # how far the backend's counts may correct the token estimate
# A completion count far above the visible text's estimate includes hidden reasoning.
PLAUSIBLE_COMPLETION_FACTOR = 2.5


@dataclass(frozen=True)
class Compaction:
    summary: str
    summarised: int  # turns folded into the summary by this compaction
    covered: int  # every message the summary now stands for
    kept: int  # turns still sent as they are


@dataclass(frozen=True)
class ContextReport:
    """What `!ai context` shows about the next request."""

    window: Window
    agent: AgentSpec
    override: bool
    stored_messages: int
    summary_covers: int


class ChatManager:
    def __init__(self, app: Surfaces) -> None:
        self.app = app
        self._rooms: dict[str, WorkingRoom] = {}
        self._history_checked: set[str] = set()  # chats known to have their history cached
        self._rebuild_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._compact_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._scale: dict[str, float] = {}  # agent id → correction learnt from reported usage

    # the in-memory map

    def load(self, rooms: list[WorkingRoom]) -> None:
        self._rooms = {room.room_id: room for room in rooms}

    async def load_from_cache(self) -> None:
        rows = await self.app.stores.rooms.list_all()
        self.load(
            [WorkingRoom.from_row(r) for r in rows if r.kind == "working" and not r.missing]
        )

    def room(self, room_id: RoomID | str) -> WorkingRoom | None:
        """A routed (not archived) working room."""
        room = self._rooms.get(room_id)
        return room if room is not None and not room.archived else None

    def all_rooms(self) -> list[WorkingRoom]:
        return list(self._rooms.values())

    async def rooms_of(self, owner: str) -> list[WorkingRoom]:
        rooms = [r for r in self._rooms.values() if r.owner == owner and not r.archived]
        return sorted(rooms, key=lambda r: (r.order_key, r.room_id))

    async def lose(self, room_id: str) -> None:
        """The bot was removed from a room: stop routing it; reconciliation records it as lost."""
        room = self._rooms.pop(room_id, None)
        if room is not None:
            self.app.log.warning("Removed from working room %s of %s", room_id, room.owner)
            row = await self.app.stores.rooms.get(room_id)
            if row is not None:
                await self.app.stores.rooms.upsert(dataclasses.replace(row, bot_membership="lost"))

    async def remember(self, room: WorkingRoom) -> None:
        """Put a (new or changed) room in the map and the cache."""
        self._rooms[room.room_id] = room
        await self.app.stores.rooms.upsert(room.to_row())

    # the binding, written to Matrix first: Matrix is the truth

    async def update_binding(self, room: WorkingRoom, **changes: Any) -> WorkingRoom:
        updated = dataclasses.replace(room, **changes)
        await self.write_binding(updated)
        await self.remember(updated)
        return updated

    async def write_binding(self, room: WorkingRoom) -> None:
        content = room.binding().to_content()
        await self.app.gateway.write(
            "update the room's binding",
            lambda: self.app.client.send_state_event(
                RoomID(room.room_id), layout.BINDING, content, state_key=""
            ),
        )

    async def touch(self, room: WorkingRoom, ts: int | None = None) -> None:
        """Record activity for `!ai rooms` (cache only); an older `ts` changes nothing."""
        current = self._rooms.get(room.room_id, room)
        ts = now_ms() if ts is None else ts
        if current.last_activity_ms is None or ts > current.last_activity_ms:
            await self.remember(dataclasses.replace(current, last_activity_ms=ts))

    # conversations

    def agent_of(self, room: WorkingRoom) -> AgentSpec:
        """The room's agent; the default one when the room's agent left the config."""
        settings = self.app.settings
        agent = settings.agent(room.agent) or settings.agent(settings.default_agent)
        assert agent is not None  # config validation guarantees the default agent
        return agent

    @staticmethod
    def system_prompt(room: WorkingRoom, agent: AgentSpec) -> str:
        return room.system_prompt if room.system_prompt is not None else agent.system_prompt

    async def start_chat(self, room: WorkingRoom) -> None:
        await self.app.stores.chats.upsert(
            Chat(
                platform_chat_id=room.platform_chat_id,
                room_id=room.room_id,
                agent=room.agent,
                created_ms=now_ms(),
            )
        )
        self._history_checked.add(room.platform_chat_id)  # a new chat has nothing to rebuild

    async def reset(self, room: WorkingRoom) -> WorkingRoom:
        """A fresh conversation in the room; the old one stays archived (cache and timeline)."""
        app = self.app
        agent = self.agent_of(room)
        old_id = room.platform_chat_id
        new_id = await app.backends.for_agent(agent).create_chat()
        updated = await self.update_binding(room, platform_chat_id=new_id)
        old = await app.stores.chats.get(old_id)
        if old is not None:
            await app.stores.chats.set_archived(old_id)
        else:  # the cache lost it: keep a row so the old conversation stays findable
            await app.stores.chats.upsert(
                Chat(old_id, room.room_id, room.agent, created_ms=now_ms(), archived=True)
            )
        await self.start_chat(updated)
        prefix = app.settings.command_prefix
        await app.send_notice(
            RoomID(room.room_id),
            f"Started a fresh conversation with `{agent.id}`: it does not see the messages above. "
            f"The earlier conversation stays archived (`!{prefix} export` exports the current one).",
            layout.reset_marker(new_id),
        )
        return updated

    async def is_answered(self, room: WorkingRoom, event_id: str, ts: int) -> bool:
        """Answered already: at or before the room's processed mark (answers go in order)."""
        mark = await self.app.stores.processed.get(room.room_id)
        return mark is not None and (mark.event_id == event_id or mark.ts > ts)

    async def mark_processed(self, room: WorkingRoom, event_id: str, ts: int) -> None:
        await self.app.stores.processed.mark(room.room_id, event_id, ts)

    async def add_user_turn(
        self, room: WorkingRoom, event_id: str, sender: str, body: str, ts: int
    ) -> None:
        await self.ensure_history(room, until_event_id=event_id)
        try:
            await self.app.stores.messages.append(
                room.platform_chat_id, "user", body, event_id=event_id, sender=sender, ts=ts
            )
        except DuplicateEventError:
            pass  # stored before a crash (or just rebuilt); answer it without storing it twice
        await self.touch(room)

    async def add_answer(
        self, room: WorkingRoom, text: str, event_id: str, usage: Usage | None
    ) -> None:
        tokens = usage.completion_tokens if usage is not None else None
        if tokens is not None and tokens > estimate_tokens(text) * PLAUSIBLE_COMPLETION_FACTOR + 16:
            tokens = None  # the count includes reasoning that is not sent back
        try:
            await self.app.stores.messages.append(
                room.platform_chat_id,
                "assistant",
                text,
                event_id=event_id,
                sender=self.app.bot_id,
                tokens=tokens,
            )
        except DuplicateEventError:
            pass

    async def last_user_turn(self, room: WorkingRoom) -> Message | None:
        return await self.app.stores.messages.last_user_message(room.platform_chat_id)

    # the request and its budget

    def scale(self, agent_id: str) -> float:
        return self._scale.get(agent_id, 1.0)

    def calibrate(self, agent_id: str, estimated: int, reported: int | None) -> None:
        """Move the agent's estimate correction halfway towards what the backend counted."""
        if not reported or estimated <= 0:
            return
        current = self.scale(agent_id)
        target = current * reported / estimated
        low, high = SCALE_BOUNDS
        self._scale[agent_id] = min(high, max(low, (current + target) / 2))

    async def _turns(
        self, room: WorkingRoom, upto_seq: int | None
    ) -> tuple[Chat | None, list[Message]]:
        """The chat row and its turns after the summary (up to `upto_seq`, for a retry)."""
        await self.ensure_history(room)
        chat = await self.app.stores.chats.get(room.platform_chat_id)
        after = chat.summary_upto_seq if chat is not None and chat.summary else None
        history = await self.app.stores.messages.history(room.platform_chat_id, after_seq=after)
        return chat, [
            m
            for m in history
            if m.role in ("user", "assistant") and (upto_seq is None or m.seq <= upto_seq)
        ]

    @staticmethod
    def _turn(message: Message) -> Turn:
        return Turn(ChatMessage(role=message.role, content=message.content), message.tokens)  # type: ignore[arg-type]

    async def build_window(
        self, room: WorkingRoom, agent: AgentSpec, upto_seq: int | None = None
    ) -> Window:
        chat, history = await self._turns(room, upto_seq)
        return assemble(
            system_prompt=self.system_prompt(room, agent),
            memory=await self.app.memory.notes(room.owner),
            summary=chat.summary if chat is not None else None,
            turns=[self._turn(m) for m in history],
            budget=agent.context_tokens,
            scale=self.scale(agent.id),
        )

    @staticmethod
    def request_for(agent: AgentSpec, window: Window) -> GenerationRequest:
        return GenerationRequest(
            model=agent.model, messages=window.messages, temperature=agent.temperature
        )

    async def build_request(
        self, room: WorkingRoom, agent: AgentSpec, upto_seq: int | None = None
    ) -> GenerationRequest:
        return self.request_for(agent, await self.build_window(room, agent, upto_seq))

    async def context_report(self, room: WorkingRoom) -> ContextReport:
        agent = self.agent_of(room)
        window = await self.build_window(room, agent)
        chat = await self.app.stores.chats.get(room.platform_chat_id)
        covers = 0
        if chat is not None and chat.summary and chat.summary_upto_seq is not None:
            covers = await self._count_upto(room.platform_chat_id, chat.summary_upto_seq)
        return ContextReport(
            window=window,
            agent=agent,
            override=room.system_prompt is not None,
            stored_messages=await self.app.stores.messages.count(room.platform_chat_id),
            summary_covers=covers,
        )

    async def _count_upto(self, platform_chat_id: str, seq: int) -> int:
        messages = self.app.stores.messages
        return await messages.count(platform_chat_id) - await messages.count(
            platform_chat_id, after_seq=seq
        )

    # compaction

    async def compact(
        self, room: WorkingRoom, agent: AgentSpec, *, upto_seq: int | None = None
    ) -> Compaction | None:
        """Summarise the older turns with the agent's backend; None when nothing is older.

        Raises BackendError when the backend fails (nothing is written then).
        """
        app = self.app
        pcid = room.platform_chat_id
        async with self._compact_locks[room.room_id]:
            chat, history = await self._turns(room, upto_seq)
            turns = [self._turn(m) for m in history]
            scale = self.scale(agent.id)
            previous = chat.summary if chat is not None else None
            head = preamble(
                self.system_prompt(room, agent), await app.memory.notes(room.owner), previous
            )
            keep = keep_tokens_after_compaction(
                agent.context_tokens, message_tokens(ChatMessage("system", head), scale)
            )
            split = compaction_split(turns, keep, scale)
            if split == 0:
                return None
            summary = await summarise(
                app.backends.for_agent(agent), agent, previous, turns[:split], scale
            )
            last = history[split - 1]
            covered = await self._count_upto(pcid, last.seq)
            # Matrix first: the visible notice is what a rebuild finds again.
            await app.send_notice(
                RoomID(room.room_id),
                summary_notice_text(summary, covered),
                layout.summary_marker(pcid, last.event_id),
            )
            if chat is None:
                await self.start_chat(room)
            await app.stores.chats.set_summary(pcid, summary, last.seq)
            return Compaction(summary, summarised=split, covered=covered, kept=len(turns) - split)

    # history rebuilt from the timeline, when the cache lost it

    async def ensure_history(self, room: WorkingRoom, until_event_id: str | None = None) -> int:
        """Rebuild the current chat's history from the room timeline once, if none is cached.

        `until_event_id` (the message being answered) drops what the owner sent after it: those
        messages are stored when their own turn comes. Returns the number of messages stored.
        """
        pcid = room.platform_chat_id
        if pcid in self._history_checked:
            return 0
        async with self._rebuild_locks[pcid]:
            if pcid in self._history_checked:
                return 0
            if await self.app.stores.messages.count(pcid) > 0:
                self._history_checked.add(pcid)
                return 0
            try:
                stored = await self._rebuild(room, until_event_id)
            except GatewayError as e:  # answer without history now; try again next time
                self.app.log.warning("Could not rebuild the history of %s: %s", room.room_id, e)
                return 0
            self._history_checked.add(pcid)
            return stored

    async def _rebuild(self, room: WorkingRoom, until_event_id: str | None) -> int:
        app = self.app
        pcid = room.platform_chat_id
        bot = app.bot_id
        events = await read_back(
            app,
            room.room_id,
            stop=lambda chunk: any(ends_conversation(e, bot, pcid) for e in chunk),
            max_pages=REBUILD_MAX_PAGES,
        )
        prefix = app.settings.command_prefix
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
        if await app.stores.chats.get(pcid) is None:
            await self.start_chat(room)
        seqs: dict[str, int] = {}
        for turn in turns:
            try:
                seqs[turn.event_id] = await app.stores.messages.append(
                    pcid,
                    turn.role,  # type: ignore[arg-type]
                    turn.content,
                    event_id=turn.event_id,
                    sender=turn.sender,
                    ts=turn.ts,
                )
            except DuplicateEventError:
                continue
        if history.summary:
            # A summary of events older than what was read back covers none of the stored ones.
            upto = seqs.get(history.summary_upto_event_id or "", 0)
            await app.stores.chats.set_summary(pcid, history.summary, upto)
        if turns or history.summary:
            app.log.info(
                "Rebuilt %d messages of %s in %s from the timeline", len(seqs), pcid, room.room_id
            )
        return len(seqs)
