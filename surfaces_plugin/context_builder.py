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
from .backends import BackendRegistry, ChatMessage, GenerationRequest
from .compaction import summarise
from .config import AgentSpec, Settings
from .context_window import (
    Turn,
    Window,
    assemble,
    compaction_split,
    keep_tokens_after_compaction,
    message_tokens,
    preamble,
)
from .history import History
from .matrix import MatrixIO
from .rooms import WorkingRoom
from .store.messages import Message
from .timeline import summary_notice_text
from .tool_runs import ToolRun

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


class ContextBuilder:
    def __init__(
        self,
        io: MatrixIO,
        history: History,
        notes: Notes,
        backends: BackendRegistry,
        settings: Callable[[], Settings],
    ) -> None:
        self.io = io
        self.history = history
        self.notes = notes
        self.backends = backends
        self.settings = settings
        self._scale: dict[str, float] = {}  # agent id → correction learnt from reported usage
        self._compact_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

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
        chat, turns = await self.history.turns(room, upto_seq)
        return assemble(
            system_prompt=system_prompt(room, agent),
            memory=await self.notes(room.owner),
            summary=chat.summary if chat is not None else None,
            turns=_turns(turns),
            budget=agent.context_tokens,
            scale=self.scale(agent.id),
        )

    @staticmethod
    def request(agent: AgentSpec, window: Window) -> GenerationRequest:
        return GenerationRequest(
            model=agent.model, messages=window.messages, temperature=agent.temperature
        )

    async def report(self, room: WorkingRoom) -> ContextReport:
        agent = self.agent_of(room)
        window = await self.window(room, agent)
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
        )

    # compaction

    async def compact(
        self, room: WorkingRoom, agent: AgentSpec, *, upto_seq: int | None = None
    ) -> Compaction | None:
        """Summarise the older turns with the agent's backend; None when nothing is older.

        Raises BackendError when the backend fails (nothing is written then).
        """
        async with self._compact_locks[room.room_id]:
            chat, history = await self.history.turns(room, upto_seq)
            turns = _turns(history)
            scale = self.scale(agent.id)
            previous = chat.summary if chat is not None else None
            head = preamble(system_prompt(room, agent), await self.notes(room.owner), previous)
            keep = keep_tokens_after_compaction(
                agent.context_tokens, message_tokens(ChatMessage("system", head), scale)
            )
            split = compaction_split(turns, keep, scale)
            if split == 0:
                return None
            summary = await summarise(
                self.backends.for_agent(agent), agent, previous, turns[:split], scale
            )
            last = history[split - 1]
            covered = await self.history.count(room.platform_chat_id, last.seq)
            # Matrix first: the visible notice is what a rebuild finds again.
            await self.io.send_notice(
                room.room_id,
                summary_notice_text(summary, covered),
                layout.summary_marker(room.platform_chat_id, last.event_id),
            )
            await self.history.set_summary(room, summary, last.seq)
            return Compaction(summary, summarised=split, covered=covered, kept=len(turns) - split)
