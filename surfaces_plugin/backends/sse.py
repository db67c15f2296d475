"""Incremental decoder for `text/event-stream`: network chunks in, complete `data` payloads out."""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Lines may be split anywhere across chunks (even inside a UTF-8 character); only whole
    lines are decoded, and an event is dispatched at the blank line that ends it."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        start = 0
        while match := _LINE_END.search(self._buffer, start):
            # A lone trailing CR may be the first half of CRLF: wait for the next chunk.
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break
            self._line(self._buffer[start : match.start()], events)
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    def finish(self) -> list[str]:
        """End of stream: an unterminated last line and undispatched data still count."""
        events: list[str] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        if not raw:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            return  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        # `event`, `id` and `retry` fields carry nothing an OpenAI-style stream needs.
