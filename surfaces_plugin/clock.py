"""Wall-clock time as Matrix counts it: milliseconds since the epoch."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)


def utc_text(ms: int | None, never: str = "never") -> str:
    """`2026-12-02 09:21 UTC`, or `never` for no time."""
    if not ms:
        return never
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))
