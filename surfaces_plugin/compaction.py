"""Summarising older turns with the agent's own backend (`!ai compact` and automatic compaction).

Every summarisation request stays within the agent's budget: long histories are folded into
the summary chunk by chunk, each request carrying the summary so far and the next chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .backends import Backend, BackendError, ChatMessage, ErrorKind, GenerationRequest
from .config import AgentSpec
from .context_window import (
    SUMMARY_SHARE,
    Turn,
    chunk_turns,
    message_tokens,
    truncate_to_tokens,
)

if TYPE_CHECKING:
    from .usage import Tally

SUMMARY_TEMPERATURE = 0.2  # summaries should be faithful, not creative
_FRAMING_TOKENS = 40  # the transcript's headings and speaker labels


def instructions(max_tokens: int) -> str:
    words = max(20, int(max_tokens * 0.7))
    return (
        "You summarise a conversation between a user and an AI assistant so that the assistant "
        "can continue it without the original messages. Keep facts, names, numbers, decisions, "
        "the user's preferences and open questions; drop pleasantries. Write in the language of "
        f"the conversation, in at most {words} words. Answer with the summary only."
    )


def transcript(previous: str | None, messages: Sequence[ChatMessage]) -> str:
    lines = []
    if previous:
        lines += ["Summary so far:", previous, "", "Messages to add to the summary:"]
    else:
        lines.append("Messages to summarise:")
    for message in messages:
        speaker = "User" if message.role == "user" else "Assistant"
        lines.append(f"{speaker}: {message.content}")
    return "\n".join(lines)


async def summarise(
    backend: Backend,
    agent: AgentSpec,
    previous: str | None,
    turns: Sequence[Turn],
    scale: float = 1.0,
    spent: Tally | None = None,
) -> str:
    """A summary of `previous` (an earlier summary) followed by `turns`, within a quarter budget;
    what its requests cost is added to `spent`."""
    cap = max(32, int(agent.context_tokens * SUMMARY_SHARE))
    system = ChatMessage("system", instructions(cap))
    fixed = message_tokens(system, scale) + cap + _FRAMING_TOKENS
    limit = max(64, agent.context_tokens - fixed)
    summary = previous
    for chunk in chunk_turns(turns, limit, scale):
        request = GenerationRequest(
            model=agent.model,
            messages=[system, ChatMessage("user", transcript(summary, chunk))],
            temperature=min(agent.temperature, SUMMARY_TEMPERATURE),
        )
        text, reported = await backend.complete_with_usage(request)
        if spent is not None:
            spent.add(reported, request.messages, text)
        text = text.strip()
        if not text:
            raise BackendError(ErrorKind.MALFORMED, "the summary came back empty")
        summary = truncate_to_tokens(text, cap, scale)
    if summary is None:
        raise ValueError("nothing to summarise")
    return summary
