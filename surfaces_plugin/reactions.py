"""The owner's reactions on answers: 🔁 regenerates one, ⏹️ or ❌ stops one that is streaming.

Only the room owner's reactions count; anyone else's are ignored, silently, as are other keys.
The bot sends nothing back for a reaction: the answer itself shows that it was heard (it is
regenerated in place, or ends with "(cancelled)").
"""

from __future__ import annotations

import logging

from mautrix.types import ReactionEvent, RelationType

from .dispatch import Dispatcher
from .rooms import RoomDirectory

REGENERATE_KEYS = frozenset({"🔁"})
STOP_KEYS = frozenset({"⏹", "❌"})
_VARIATION_SELECTORS = str.maketrans("", "", "\ufe0e\ufe0f")  # ⏹️ and ⏹ are the same key


def reaction_key(key: str) -> str:
    """A reaction's key as compared here: without emoji variation selectors."""
    return key.translate(_VARIATION_SELECTORS)


class Reactions:
    def __init__(self, rooms: RoomDirectory, dispatcher: Dispatcher, log: logging.Logger) -> None:
        self.rooms = rooms
        self.dispatcher = dispatcher
        self.log = log

    def on_reaction(self, evt: ReactionEvent) -> None:
        """Synchronous, so a reaction is in order with the messages and edits around it."""
        relates = evt.content.relates_to
        room = self.rooms.room(evt.room_id)
        if (
            room is None
            or evt.sender != room.owner
            or relates.rel_type != RelationType.ANNOTATION
            or not relates.event_id
            or not isinstance(relates.key, str)
        ):
            return
        key = reaction_key(relates.key)
        if key in STOP_KEYS:
            if self.dispatcher.stop_answer(evt.room_id, relates.event_id):
                self.log.debug("Stopped the answer %s in %s (reaction)", relates.event_id, room.room_id)
        elif key in REGENERATE_KEYS:
            self.dispatcher.regenerate_answer(evt.room_id, relates.event_id, evt.event_id)
