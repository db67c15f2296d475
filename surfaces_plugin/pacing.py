"""When a streamed answer is shown, and how much of it (pure: the caller passes the time).

The first post is what people's phones show (edits do not notify), so it waits for a complete
sentence or line, or for a short deadline after the first words, whichever comes first. Later
edits also stop at the last sentence or line end, at an interval that grows over a long answer,
at most `max_edits` of them; a slow homeserver slows them further.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import StreamingSettings

# A sentence ends at . ! ? … (and closing quotes, brackets or Markdown emphasis) before
# whitespace, or at CJK full stops; a line ends at a newline (the break goes before it).
_ENDS = re.compile(r"[.!?…]+[\"'”’)\]*_`]*(?=\s)|[。！？]|\n")
# Edits over which the interval grows to its maximum (at 1 → 3 s: 1, 1.5, 2, 2.5, then 3 s).
RAMP_EDITS = 4
# `1. ` at the start of a line numbers a list item; it ends nothing.
_LIST_MARKER = re.compile(r"[ \t]*\d+\.$")


def readable_end(text: str, start: int = 0) -> int:
    """The end of the last complete sentence or line after `start`, or 0 when none ends there."""
    cut = 0
    for match in _ENDS.finditer(text, start):
        if match.group() == "\n":
            end = match.start()
        else:
            end = match.end()
            line_start = text.rfind("\n", 0, match.start()) + 1
            if _LIST_MARKER.match(text, line_start, end):
                continue
        if text[start:end].strip():  # never a post of nothing but whitespace
            cut = end
    return cut


def word_end(text: str, start: int = 0) -> int:
    """The end of the last complete word after `start` (all of `text` when none is complete)."""
    at = max(text.rfind(" ", start), text.rfind("\n", start))
    return at if at > start and text[start:at].strip() else len(text)


@dataclass(frozen=True)
class Pace:
    first_post_s: float  # the first post's deadline after the first words
    interval_s: float  # between edits at first; 0 = every piece shown at once (tests, demos)
    max_interval_s: float  # ... growing to this over the answer's allowed edits
    max_edits: int  # partial sends per answer (the final edit is always sent)

    @classmethod
    def of(cls, settings: StreamingSettings) -> Pace:
        return cls(
            settings.first_post_ms / 1000,
            settings.edit_interval_ms / 1000,
            max(settings.max_edit_interval_ms, settings.edit_interval_ms) / 1000,
            settings.max_edits,
        )


@dataclass(frozen=True)
class Step:
    """Show `text[:show]` now; or look again after `wait` seconds (None: when more text comes)."""

    show: int | None = None
    wait: float | None = None


class Pacer:
    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self.first_words_at: float | None = None
        self.last_sent_at: float | None = None  # when the last partial send started
        self.last_send_s = 0.0  # how long the homeserver took for it
        self.sends = 0  # partial sends so far (the first post included)

    def interval(self) -> float:
        """The pause before the next edit: from `interval_s` up to `max_interval_s` within
        `RAMP_EDITS` edits, so a short answer is edited about once and a long one rarely."""
        p = self.pace
        grown = min(1.0, max(0, self.sends - 1) / RAMP_EDITS)
        return p.interval_s + (p.max_interval_s - p.interval_s) * grown

    def step(self, text: str, shown: int, now: float) -> Step:
        """What to do with `text`, of which the message shows the first `shown` characters."""
        if not text.strip() or self.sends >= self.pace.max_edits:
            return Step()
        if self.first_words_at is None:
            self.first_words_at = now
        if self.pace.interval_s == 0:
            return Step(show=len(text)) if len(text) > shown else Step()
        if self.last_sent_at is None:  # the first post: a sentence, or the deadline
            cut = readable_end(text)
            deadline = self.first_words_at + self.pace.first_post_s
            if cut:
                return Step(show=cut)
            if now >= deadline:
                return Step(show=word_end(text))
            return Step(wait=deadline - now)
        # A slow homeserver (429s retried, load) gets fewer edits, not a queue of them.
        due = self.last_sent_at + max(self.interval(), 2 * self.last_send_s)
        if now < due:
            return Step(wait=due - now)
        cut = readable_end(text, shown)
        if cut > shown:
            return Step(show=cut)
        overdue = due + self.interval()  # a sentence this long is shown up to its last word
        if now >= overdue:
            cut = word_end(text, shown)
            return Step(show=cut) if cut > shown else Step()
        return Step(wait=overdue - now)

    def sent(self, started: float, finished: float) -> None:
        self.sends += 1
        self.last_sent_at = started
        self.last_send_s = finished - started
