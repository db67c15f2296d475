"""The request for a room's next answer: its window within the agent's budget, and compaction.

`context_window.py` holds the pure arithmetic; this service feeds it the room's system prompt,
the owner's shared notes, the chat's summary and turns, and learns from the usage backends report.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import layout
from .backends import BackendError, BackendRegistry, ChatMessage, GenerationRequest
from .compaction import summarise
from .config import AgentSpec, Settings
from .context_window import (
    Turn,
    Window,
    assemble,
    compaction_split,
    conversation_seed,
    keep_tokens_after_compaction,
    message_tokens,
    preamble,
)
from .history import History
from .jobs import Job
from .matrix import MatrixIO
from .media import MediaService
from .rooms import WorkingRoom
from .store.messages import Message
from .timeline import summary_notice_text
from .tool_runs import ToolRun
from .usage import Tally, UsageLedger

SCALE_BOUNDS = (0.5, 2.0)  # how far the backend's counts may correct the token estimate

Notes = Callable[[str], Awaitable[tuple[str, ...]]]  # user id → their shared memory notes


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
    held_by_provider: bool = False  # the platform keeps the conversation (server state)
    provider_prompt_tokens: int | None = None  # the prompt of its last answer, as it reported
    attachments: tuple[tuple[str, int], ...] = ()  # (label, tokens) of the request's media turns


def system_prompt(room: WorkingRoom, agent: AgentSpec) -> str:
    """The room's override wins over the agent's default."""
    return room.system_prompt if room.system_prompt is not None else agent.system_prompt


def _turn(message: Message) -> Turn:
    if message.role == "tools":
        run = ToolRun.loads(message.content)
        if run is None:  # not a record this version can read; keep the turn count aligned
            return Turn(ChatMessage("assistant", "(tool calls)"))
        return Turn(ChatMessage("assistant", run.transcript()), None, tuple(run.messages()))
    return Turn(ChatMessage(role=message.role, content=message.content), message.tokens)


def _turns(messages: list[Message]) -> list[Turn]:
    return [_turn(m) for m in messages]


def _attachment_label(message: Message) -> str:
    assert message.attachment is not None
    return message.attachment.label


class ContextBuilder:
    def __init__(
        self,
        io: MatrixIO,
        history: History,
        notes: Notes,
        backends: BackendRegistry,
        settings: Callable[[], Settings],
        usage: UsageLedger,
        media: MediaService | None = None,
    ) -> None:
        self.io = io
        self.usage = usage  # summaries cost tokens too: counted for the room's owner
        self.media = media  # reads the images and files of user turns into requests
        self.history = history
        self.notes = notes
        self.backends = backends
        self.settings = settings
        self._scale: dict[str, float] = {}  # agent id → correction learnt from reported usage
        self._compact_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # (room, conversation) pairs already renewed after the provider lost them, and the
        # (room, message, attempt) answers that renewed one: each happens once.
        self._renewed: set[tuple[str, ...]] = set()

    def agent_of(self, room: WorkingRoom) -> AgentSpec:
        return self.settings().agent_or_default(room.agent)

    # token calibration

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

    # the request

    async def window(
        self, room: WorkingRoom, agent: AgentSpec, upto_seq: int | None = None
    ) -> Window:
        return (await self._window(room, agent, upto_seq))[0]

    async def _window(
        self, room: WorkingRoom, agent: AgentSpec, upto_seq: int | None = None
    ) -> tuple[Window, list[Message], list[Turn]]:
        chat, messages = await self.history.turns(room, upto_seq)
        turns = await self.turns_of(messages, agent)
        window = assemble(
            system_prompt=system_prompt(room, agent),
            memory=await self.notes(room.owner),
            summary=chat.summary if chat is not None else None,
            turns=turns,
            budget=agent.context_tokens,
            scale=self.scale(agent.id),
        )
        return window, messages, turns

    async def turns_of(self, messages: list[Message], agent: AgentSpec) -> list[Turn]:
        """The stored messages as request turns; images and files are fetched and read now."""
        turns = _turns(messages)
        media = self.media
        if media is None:
            return turns
        with_media = [
            (i, m) for i, m in enumerate(messages) if m.role == "user" and m.attachment is not None
        ]
        read = await asyncio.gather(
            *(
                media.request_message(m.content, m.attachment, vision=agent.vision)
                for _, m in with_media
                if m.attachment is not None
            )
        )
        for (i, _), message in zip(with_media, read, strict=True):
            turns[i] = Turn(message)
        return turns

    def request(
        self, agent: AgentSpec, window: Window, room: WorkingRoom | None = None
    ) -> GenerationRequest:
        """`room` names the conversation a server-state backend continues (as it is now: a
        compaction may just have renewed it)."""
        chat_id = self.history.rooms.current(room).platform_chat_id if room is not None else ""
        return GenerationRequest(
            model=agent.model,
            messages=window.messages,
            temperature=agent.temperature,
            max_tokens=agent.max_tokens,
            chat_id=chat_id,
        )

    def holds_state(self, agent: AgentSpec) -> bool:
        """The agent's provider keeps the conversation (`platform_chat_id` is its id)."""
        return self.backends.for_agent(agent).features.server_state

    async def report(self, room: WorkingRoom) -> ContextReport:
        room = self.history.rooms.current(room)
        agent = self.agent_of(room)
        window, messages, turns = await self._window(room, agent)
        sent = len(messages) - window.turns_included  # the turns before this one are left out
        scale = self.scale(agent.id)
        attachments = tuple(
            (_attachment_label(m), message_tokens(t, scale))
            for m, t in zip(messages[sent:], turns[sent:], strict=True)
            if m.role == "user" and m.attachment is not None
        )
        chat = await self.history.chat(room)
        covers = 0
        if chat is not None and chat.summary and chat.summary_upto_seq is not None:
            covers = await self.history.count(room.platform_chat_id, chat.summary_upto_seq)
        return ContextReport(
            window=window,
            agent=agent,
            override=room.system_prompt is not None,
            stored_messages=await self.history.count(room.platform_chat_id),
            summary_covers=covers,
            held_by_provider=self.holds_state(agent),
            provider_prompt_tokens=chat.prompt_tokens if chat is not None else None,
            attachments=attachments,
        )

    # compaction

    async def compact(
        self, room: WorkingRoom, agent: AgentSpec, *, upto_seq: int | None = None
    ) -> Compaction | None:
        """Summarise the older turns with the agent's backend; None when nothing is older.

        Raises BackendError when the backend fails (nothing is written then).
        """
        async with self._compact_locks[room.room_id]:
            room = self.history.rooms.current(room)
            chat, history = await self.history.turns(room, upto_seq)
            turns = await self.turns_of(history, agent)
            scale = self.scale(agent.id)
            previous = chat.summary if chat is not None else None
            head = preamble(system_prompt(room, agent), await self.notes(room.owner), previous)
            keep = keep_tokens_after_compaction(
                agent.context_tokens, message_tokens(ChatMessage("system", head), scale)
            )
            split = compaction_split(turns, keep, scale)
            if split == 0:
                return None
            backend = self.backends.for_agent(agent)
            spent = Tally()
            summary = await summarise(backend, agent, previous, turns[:split], scale, spent)
            last = history[split - 1]
            covered = await self.history.count(room.platform_chat_id, last.seq)
            renewed = None
            if backend.features.server_state:
                # The provider's copy only shrinks in a new conversation holding the summary
                # and the kept turns; created before anything is written, so a refusal
                # leaves the room as it was.
                kept = assemble(
                    system_prompt=system_prompt(room, agent),
                    memory=await self.notes(room.owner),
                    summary=summary,
                    turns=turns[split:],
                    budget=agent.context_tokens,
                    scale=scale,
                )
                renewed = await backend.create_chat(conversation_seed(kept.messages))
            # Matrix first: the visible notice is what a rebuild finds again.
            notice_id = await self.io.send_notice(
                room.room_id,
                summary_notice_text(summary, covered),
                layout.summary_marker(
                    renewed or room.platform_chat_id, last.event_id, spent.usage, agent.id
                ),
            )
            await self.usage.record(room.owner, agent.id, spent.usage, notice_id)
            await self.history.set_summary(room, summary, last.seq)
            if renewed is not None:
                await self.history.switch_chat(room, renewed)
            return Compaction(summary, summarised=split, covered=covered, kept=len(turns) - split)

    # a conversation the provider lost

    async def switch_agent(self, room: WorkingRoom, agent: AgentSpec) -> WorkingRoom:
        """The room talks to `agent` from now on, its conversation kept. A provider that holds
        conversations gets one seeded with the room's history (what fits the agent's budget).

        Raises BackendError when that provider refuses (then nothing changed).
        """
        room = self.history.rooms.current(room)
        backend = self.backends.for_agent(agent)
        if backend.features.server_state and self.agent_of(room).backend != agent.backend:
            window = await self.window(room, agent)
            new_id = await backend.create_chat(conversation_seed(window.messages))
            return await self.history.switch_chat(room, new_id, agent=agent.id)
        return await self.history.rooms.update_binding(room, agent=agent.id)

    async def continue_lost_chat(
        self, room: WorkingRoom, agent: AgentSpec, job: Job
    ) -> WorkingRoom | None:
        """The provider no longer has the room's conversation: once per room and lost id (and
        once per answer), say so and go on in a new one seeded with the room's window.

        Returns the room with its new conversation, or None when this was done already or the
        provider refused a new one (the caller then shows its error as usual).
        """
        room = self.history.rooms.current(room)
        lost = (room.room_id, room.platform_chat_id)
        answer = (room.room_id, job.event_id, job.attempt)
        if lost in self._renewed or answer in self._renewed:
            return None
        self._renewed |= {lost, answer}
        window = await self.window(room, agent, upto_seq=job.upto_seq)
        try:
            renewed = await self.history.replace_chat(room, conversation_seed(window.messages))
        except BackendError as e:  # `!ai retry` may try again
            self.io.log.warning("No new conversation for %s after a loss: %s", room.room_id, e)
            self._renewed -= {lost, answer}
            return None
        await self.io.send_notice(
            room.room_id,
            f"The provider of `{agent.id}` no longer had this conversation. It goes on in a "
            "new one that starts from this room's history (what fits the context budget).",
            txn=job.txn(f"conversation lost {lost[1]}"),
        )
        return renewed
