"""A unit of work for a room's worker: answer one user message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """Answer `event_id` (a user message) in `room_id`; `retry` answers a stored message again."""

    room_id: str
    event_id: str
    sender: str
    body: str
    ts: int
    retry: bool = False
    upto_seq: int | None = None  # a retry answers with the history up to that message
