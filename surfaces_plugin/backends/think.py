"""Hides `<think>…</think>` reasoning from streamed answer text, even when tags are split."""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ThinkFilter:
    """Feed raw deltas, get visible text. Leading whitespace of the answer is dropped, since models
    usually put blank lines after their reasoning."""

    def __init__(self) -> None:
        self._pending = ""
        self._inside = False
        self._started = False

    def feed(self, text: str) -> str:
        self._pending += text
        visible: list[str] = []
        while True:
            tag, index = self._next_tag()
            if index < 0:
                break
            if not self._inside:
                visible.append(self._pending[:index])
            self._pending = self._pending[index + len(tag) :]
            # A closing tag outside reasoning (the template opened it) is just dropped.
            self._inside = tag == OPEN
        tags = (CLOSE,) if self._inside else (OPEN, CLOSE)
        keep = max(_partial_tag_len(self._pending, t) for t in tags)
        if not self._inside:
            visible.append(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return self._emit("".join(visible))

    def _next_tag(self) -> tuple[str, int]:
        """The first tag that changes state: `</think>` inside reasoning, either tag outside."""
        close = self._pending.find(CLOSE)
        if self._inside:
            return CLOSE, close
        opening = self._pending.find(OPEN)
        if opening >= 0 and (close < 0 or opening < close):
            return OPEN, opening
        return CLOSE, close

    def flush(self) -> str:
        """End of answer: a held-back partial tag was real text; unclosed reasoning stays hidden."""
        rest = "" if self._inside else self._pending
        self._pending = ""
        return self._emit(rest)

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text
