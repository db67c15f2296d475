"""Assembling a request within the agent's token budget (pure).

Order of priority: the system prompt, shared memory, the latest summary, then as many of the
most recent turns as fit. Tokens are estimated (an exact tokenizer is optional: maubot cannot
install one, and tokenizer files cannot be downloaded at run time); counts the backend reported
(an answer's completion tokens) replace the estimate, and a per-agent `scale` learnt from the
backend's prompt-token counts corrects it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .backends import ChatMessage
from .tokens import estimate_tokens

MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, as chat formats add per message
COMPACT_KEEP_SHARE = 0.5  # compaction keeps the newest turns that fit in this share of the budget
SUMMARY_SHARE = 0.25  # a summary may take at most this share of the budget
# What one image costs, estimated without decoding it: providers bill images by their pixels
# after their own downscaling (OpenAI: 765 tokens for 1024x1024 at high detail; Anthropic:
# width*height/750, about 1,600 at most), so a middle figure keeps the window honest.
IMAGE_TOKENS = 1000

MEMORY_HEADING = "Notes the user shares with all their conversations:"
SUMMARY_HEADING = "Summary of the earlier conversation:"


@dataclass(frozen=True)
class Turn:
    """A stored user message or answer; `tokens` is the backend's own count, when it gave one.

    A turn's tool calls are one Turn: `exchange` is what a request carries (the calls and their
    results, never split apart), `message` the same as plain text (summaries, agents without tools).
    """

    message: ChatMessage
    tokens: int | None = None
    exchange: tuple[ChatMessage, ...] = ()


def message_tokens(message: ChatMessage | Turn, scale: float = 1.0) -> int:
    if isinstance(message, Turn):
        if message.tokens is not None:
            return message.tokens + MESSAGE_OVERHEAD_TOKENS
        message = message.message
    text = math.ceil(estimate_tokens(message.content) * scale)
    return text + IMAGE_TOKENS * len(message.images) + MESSAGE_OVERHEAD_TOKENS


def _message(turn: ChatMessage | Turn) -> ChatMessage:
    return turn.message if isinstance(turn, Turn) else turn


def _request_messages(turn: ChatMessage | Turn) -> list[ChatMessage]:
    if isinstance(turn, Turn) and turn.exchange:
        return list(turn.exchange)
    return [_message(turn)]


@dataclass(frozen=True)
class Window:
    messages: list[ChatMessage]
    tokens: int
    budget: int
    turns_included: int
    turns_omitted: int
    summary_used: bool
    memory_notes: int

    @property
    def over_budget(self) -> bool:
        return self.turns_omitted > 0


def preamble(system_prompt: str, memory: Sequence[str], summary: str | None) -> str:
    parts = [system_prompt.strip()] if system_prompt.strip() else []
    if memory:
        notes = "\n".join(f"- {note}" for note in memory)
        parts.append(f"{MEMORY_HEADING}\n{notes}")
    if summary:
        parts.append(f"{SUMMARY_HEADING}\n{summary}")
    return "\n\n".join(parts)


def assemble(
    *,
    system_prompt: str,
    memory: Sequence[str],
    summary: str | None,
    turns: Sequence[ChatMessage | Turn],
    budget: int,
    scale: float = 1.0,
) -> Window:
    """The newest turns that fit after the preamble; the latest turn is always sent."""
    head = preamble(system_prompt, memory, summary)
    messages: list[ChatMessage] = [ChatMessage("system", head)] if head else []
    used = sum(message_tokens(m, scale) for m in messages)
    kept: list[list[ChatMessage]] = []
    for turn in reversed(turns):
        cost = message_tokens(turn, scale)
        if kept and used + cost > budget:
            break
        kept.append(_request_messages(turn))
        used += cost
    kept.reverse()
    return Window(
        messages=messages + [m for group in kept for m in group],
        tokens=used,
        budget=budget,
        turns_included=len(kept),
        turns_omitted=len(turns) - len(kept),
        summary_used=bool(summary),
        memory_notes=len(memory),
    )


def conversation_seed(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """What a new platform-held conversation starts with: the request up to its last answer.

    A server-state backend sends what follows the last answer into the conversation (all of it
    when nothing was answered yet), so a seed holding those messages too would show the model
    the pending question twice.
    """
    answered = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return list(messages[: answered + 1])


def compaction_split(
    turns: Sequence[ChatMessage | Turn], keep_tokens: float, scale: float = 1.0
) -> int:
    """How many of the oldest turns to summarise: all but the newest that fit in `keep_tokens`.

    The last user turn and what follows it are always kept, so a retry still has its question.
    0 means there is nothing to compact.
    """
    if not turns:
        return 0
    last_user = max(
        (i for i, t in enumerate(turns) if _message(t).role == "user"), default=len(turns) - 1
    )
    start = len(turns)
    used = 0
    while start > 0:
        cost = message_tokens(turns[start - 1], scale)
        if start <= last_user and used + cost > keep_tokens:
            break
        used += cost
        start -= 1
    return min(start, last_user)


def keep_tokens_after_compaction(budget: int, preamble_tokens: int) -> float:
    """Room for the turns kept by compaction: about half the budget, less if the preamble is big."""
    room_left = budget - preamble_tokens - budget * SUMMARY_SHARE
    return max(0.0, min(budget * COMPACT_KEEP_SHARE, room_left))


def truncate_to_tokens(text: str, limit: int, scale: float = 1.0) -> str:
    """`text` cut (at a word where possible) so its estimate stays within `limit` tokens."""
    if math.ceil(estimate_tokens(text) * scale) <= limit:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits
        mid = (low + high + 1) // 2
        if math.ceil(estimate_tokens(text[:mid]) * scale) + 1 <= limit:
            low = mid
        else:
            high = mid - 1
    cut = text[:low]
    space = cut.rfind(" ")
    if space > low * 0.8:
        cut = cut[:space]
    return cut.rstrip() + "…"


def chunk_turns(
    turns: Sequence[ChatMessage | Turn], limit: int, scale: float = 1.0
) -> list[list[ChatMessage]]:
    """Consecutive groups of turns each within `limit` tokens; a turn too long alone is cut."""
    chunks: list[list[ChatMessage]] = []
    current: list[ChatMessage] = []
    used = 0
    for turn in turns:
        message = _message(turn)
        cost = message_tokens(turn, scale)
        if cost > limit:
            content = truncate_to_tokens(message.content, limit - MESSAGE_OVERHEAD_TOKENS, scale)
            message = ChatMessage(message.role, content)
            cost = message_tokens(message, scale)
        if current and used + cost > limit:
            chunks.append(current)
            current, used = [], 0
        current.append(message)
        used += cost
    if current:
        chunks.append(current)
    return chunks
