"""A unit of work for a room's worker: answer one user message."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import Attachment
from .txn import txn_id


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
    attempt: str = ""  # a retry: the `!ai retry` event id, so its sends are not deduplicated
    attachment: Attachment | None = None  # an image or file the message carries (`body`: its text)
    transcript: str | None = None  # a voice message's transcript already shown (catch-up)

    def txn(self, label: str) -> str | None:
        """The transaction id of this answer's part `label` (see `txn.txn_id`); None: random."""
        return txn_id(self.event_id, label, self.attempt) if self.event_id else None
