"""Assembling a request within the agent's token budget (pure).

Order of priority: the system prompt, shared memory, the latest summary, then as many of the
most recent turns as fit. Tokens are estimated (an exact tokenizer is optional: maubot cannot
install one, and tokenizer files cannot be downloaded at run time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .backends import ChatMessage

MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, as chat formats add per message


def _load_exact_counter():  # noqa: ANN202 - optional dependency, used when installed
    try:
        import tiktoken  # type: ignore[import-not-found]

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


_exact = None
_exact_checked = False


def estimate_tokens(text: str) -> int:
    """A calibrated estimate: ~4 characters per token for Latin text, 1 per CJK character."""
    global _exact, _exact_checked
    if not _exact_checked:
        _exact, _exact_checked = _load_exact_counter(), True
    if _exact is not None:
        return _exact(text)
    wide = sum(1 for ch in text if ord(ch) > 0x2E80)
    narrow = len(text) - wide
    words = len(text.split())
    # Between a per-character and a per-word estimate; punctuation-heavy text leans on chars.
    return wide + max(math.ceil(narrow / 4), math.ceil(words * 1.3)) if narrow else wide


def message_tokens(message: ChatMessage) -> int:
    return estimate_tokens(message.content) + MESSAGE_OVERHEAD_TOKENS


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
        parts.append(f"Notes the user shares with all their conversations:\n{notes}")
    if summary:
        parts.append(f"Summary of the earlier conversation:\n{summary}")
    return "\n\n".join(parts)


def assemble(
    *,
    system_prompt: str,
    memory: Sequence[str],
    summary: str | None,
    turns: Sequence[ChatMessage],
    budget: int,
) -> Window:
    """The newest turns that fit after the preamble; the latest turn is always sent."""
    head = preamble(system_prompt, memory, summary)
    messages: list[ChatMessage] = [ChatMessage("system", head)] if head else []
    used = sum(message_tokens(m) for m in messages)
    kept: list[ChatMessage] = []
    for turn in reversed(turns):
        cost = message_tokens(turn)
        if kept and used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    return Window(
        messages=messages + kept,
        tokens=used,
        budget=budget,
        turns_included=len(kept),
        turns_omitted=len(turns) - len(kept),
        summary_used=bool(summary),
        memory_notes=len(memory),
    )
