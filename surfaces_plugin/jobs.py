"""A unit of work for a room's worker: answer one user message."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import Attachment
from .txn import txn_id


@dataclass(frozen=True)
class Job:
    """Answer `event_id` (a user message) in `room_id`; `retry` answers a stored message again.

    `regenerate` (the owner's edit of the message, or their 🔁 reaction on its answer) answers
    the room's last message again with `body`, in place of its previous answer (`replaces`,
    found by the worker).
    """

    room_id: str
    event_id: str
    sender: str
    body: str
    ts: int
    retry: bool = False
    upto_seq: int | None = None  # a retry answers with the history up to that message
    attempt: str = ""  # a retry: the `!ai retry` event id, so its sends are not deduplicated
    attachment: Attachment | None = None  # an image or file the message carries (`body`: its text)
    regenerate: str = ""  # the edit or reaction event that asks for the answer again
    edited: bool = False  # `regenerate` is an edit: `body` is the message's new text
    replaces: str | None = None  # the previous answer's event, edited in place
    transcript: str | None = None  # a voice message's transcript already shown (catch-up)

    @property
    def key(self) -> str:
        """What makes this job the same as another (one edit delivered twice is one job)."""
        return self.regenerate or self.event_id

    def txn(self, label: str) -> str | None:
        """The transaction id of this answer's part `label` (see `txn.txn_id`); None: random."""
        attempt = self.attempt or self.regenerate  # a regenerated answer's sends are its own
        return txn_id(self.event_id, label, attempt) if self.event_id else None
