"""A turn's tool calls: the record kept in history and on the room's tool notice, and the notice.

While a turn calls tools, one notice in the room shows each call compactly (name, a short
summary of its arguments, then its outcome), edited as calls run: notices do not notify, and
one message per turn does not flood the room. The notice's content carries the record (calls
and what they returned, shortened to fit an event), so a history rebuilt from the timeline has
the tool exchange; `done` stays false until the run ended, so catch-up can tell a run a crash
cut off (it is not re-run silently: the room is told, `!ai retry` runs it again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mautrix.types import EventID

from . import layout, replies
from .backends import ChatMessage, ToolCall, ToolSpec
from .config import AgentSpec
from .matrix import MatrixIO

RESULT_KEEP_CHARS = 4000  # of each result, in history and on the notice
RECORD_MAX_BYTES = 24_000  # the record appears twice in an edit; an event holds 64 KiB
_SHOWN_ARGUMENTS = 60
_SHOWN_RESULT = 80


class ToolResultLike(Protocol):
    text: str
    is_error: bool


class ToolSource(Protocol):
    """Where an agent's tools come from (the MCP ToolBox)."""

    async def tools_for(self, agent: AgentSpec) -> list[ToolSpec]: ...

    async def call(self, agent: AgentSpec, call: ToolCall) -> ToolResultLike: ...


@dataclass(frozen=True)
class Outcome:
    call: ToolCall
    result: str
    is_error: bool = False


@dataclass
class ToolRun:
    """The calls of one turn, step by step (a step: the calls one model response asked for)."""

    steps: list[list[Outcome]] = field(default_factory=list)
    running: list[ToolCall] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(len(step) for step in self.steps)

    def messages(self) -> list[ChatMessage]:
        """The exchange as a request carries it: the calls, then one result per call."""
        out: list[ChatMessage] = []
        for step in self.steps:
            out.append(ChatMessage("assistant", "", tool_calls=tuple(o.call for o in step)))
            out += [
                ChatMessage(
                    "tool",
                    o.result,
                    tool_call_id=o.call.id,
                    tool_name=o.call.name,
                    is_error=o.is_error,
                )
                for o in step
            ]
        return out

    def to_json(self) -> list[list[dict[str, Any]]]:
        """The steps as stored (database and notice), results shortened to fit one event."""
        keep = RESULT_KEEP_CHARS
        while True:
            data = [[_outcome_json(o, keep) for o in step] for step in self.steps]
            if len(json.dumps(data).encode()) <= RECORD_MAX_BYTES or keep <= 100:
                return data
            keep //= 2

    @classmethod
    def from_json(cls, data: object) -> ToolRun | None:
        """The record read back (from the database or a notice); None when it is not one."""
        if not isinstance(data, list):
            return None
        steps: list[list[Outcome]] = []
        for step in data:
            if not isinstance(step, list) or not step:
                return None
            outcomes = [_outcome(item) for item in step]
            if any(o is None for o in outcomes):
                return None
            steps.append([o for o in outcomes if o is not None])
        return cls(steps=steps) if steps else None

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def loads(cls, text: str) -> ToolRun | None:
        try:
            return cls.from_json(json.loads(text))
        except ValueError:
            return None

    def lines(self, ended: bool = False) -> list[str]:
        """The notice's body: one line per call, finished ones with their outcome; once the run
        ended (cancelled, stopped), calls still running stay listed as not finished."""
        lines = [f"🔧 {_shown_call(o.call)} → {_shown_outcome(o)}" for s in self.steps for o in s]
        pending = "→ not finished" if ended else "…"
        lines += [f"🔧 {_shown_call(call)} {pending}" for call in self.running]
        return lines

    def transcript(self) -> str:
        """The exchange as plain text (compaction, export, agents without tools now)."""
        return "\n".join(
            f"[tool {o.call.name}({_arguments(o.call, None)}) → "
            f"{'error: ' if o.is_error else ''}{o.result}]"
            for step in self.steps
            for o in step
        )


def _outcome_json(outcome: Outcome, keep: int) -> dict[str, Any]:
    result = outcome.result
    if len(result) > keep:
        result = result[:keep] + f"… [{len(outcome.result) - keep} characters left out]"
    data: dict[str, Any] = {
        "id": outcome.call.id,
        "name": outcome.call.name,
        "arguments": outcome.call.arguments,
        "result": result,
    }
    if outcome.is_error:
        data["is_error"] = True
    return data


def _outcome(item: object) -> Outcome | None:
    if not isinstance(item, dict):
        return None
    call_id, name, arguments, result = (
        item.get("id"),
        item.get("name"),
        item.get("arguments"),
        item.get("result"),
    )
    if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name):
        return None
    if not isinstance(arguments, dict) or not isinstance(result, str):
        return None
    return Outcome(ToolCall(call_id, name, arguments), result, item.get("is_error") is True)


def _arguments(call: ToolCall, limit: int | None) -> str:
    text = ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in call.arguments.items())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _shown_call(call: ToolCall) -> str:
    return f"`{call.name}`({_arguments(call, _SHOWN_ARGUMENTS)})"


def _shown_outcome(outcome: Outcome) -> str:
    text = " ".join(outcome.result.split())
    if len(text) > _SHOWN_RESULT:
        text = text[: _SHOWN_RESULT - 1] + "…"
    return f"⚠️ {text}" if outcome.is_error else (text or "(no output)")


class ToolNotice:
    """The room's view of a turn's tool calls: posted at the first call, edited as they run."""

    def __init__(
        self,
        io: MatrixIO,
        room_id: str,
        marker: Callable[[ToolRun, bool], dict[str, Any]],
        txn: Callable[[str], str | None],
    ) -> None:
        self.io = io
        self.room_id = room_id
        self.marker = marker  # (run, done) → the keys that carry the record
        self.txn = txn
        self.run = ToolRun()
        self.event_id: EventID | None = None
        self._edits = 0

    async def start(self, calls: Sequence[ToolCall]) -> None:
        self.run.running = list(calls)
        await self._show(done=False)

    async def finish_step(self, outcomes: list[Outcome]) -> None:
        self.run.running = []
        self.run.steps.append(outcomes)
        await self._show(done=False)

    async def end(self, note: str = "") -> None:
        """The run is over (answered, cancelled, failed, stopped at the step bound)."""
        if self.event_id is None:
            return
        await self._show(done=True, note=note)
        self.run.running = []

    async def _show(self, done: bool, note: str = "") -> None:
        body = "\n".join(self.run.lines(ended=done) + ([f"*{note}*"] if note else []))
        content = replies.notice(body, self.marker(self.run, done))
        if self.event_id is None:
            self.event_id = await self.io.send_content(self.room_id, content, self.txn("tools"))
            return
        self._edits += 1
        label = "tools end" if done else f"tools {self._edits}"
        await self.io.edit(
            self.room_id, self.event_id, content, self.txn(f"{label} {self.event_id}")
        )


def marker_for(
    platform_chat_id: str, agent: str, answers: str | None
) -> Callable[[ToolRun, bool], dict[str, Any]]:
    def marker(run: ToolRun, done: bool) -> dict[str, Any]:
        return layout.tools_marker(
            platform_chat_id, agent, run.to_json(), answers=answers, done=done
        )

    return marker


def without_tool_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Tool exchanges rewritten as the assistant's text, for a request that offers no tools."""
    out: list[ChatMessage] = []
    calls: dict[str, ToolCall] = {}
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls.update((call.id, call) for call in message.tool_calls)
            if message.content.strip():
                out.append(ChatMessage("assistant", message.content))
            continue
        if message.role == "tool":
            call = calls.get(message.tool_call_id) or ToolCall(
                message.tool_call_id, message.tool_name or "tool", {}
            )
            outcome = Outcome(call, message.content, message.is_error)
            out.append(ChatMessage("assistant", ToolRun(steps=[[outcome]]).transcript()))
            continue
        out.append(message)
    return out
