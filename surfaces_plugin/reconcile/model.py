"""Plain data the planner works on: a snapshot of Matrix, the cache rows, and the write actions.

Everything is frozen and JSON-shaped; the inventory (I/O) builds these, the planner only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from ..layout import (
    MEMBER_TYPE,
    POWER_LEVELS_TYPE,
    AccessDecisions,
    Binding,
    RoomKind,
    create_room_version,
)

StateKey = tuple[str, str]  # (event type, state_key)


@dataclass(frozen=True)
class StateEntry:
    """One state event as plain data (not mautrix's `StateEvent`: the planner needs no I/O types)."""

    type: str
    state_key: str
    sender: str
    content: Mapping[str, Any]  # plain JSON (serialize mautrix objects first)
    event_id: str = ""
    origin_server_ts: int = 0


@dataclass(frozen=True)
class RoomSnapshot:
    """One room as read from `GET /state`, plus the bot's membership from `/joined_rooms`.

    `bot_membership` is separate because `/state` still answers (stale) after a kick.
    """

    room_id: str
    create: StateEntry | None
    state: Mapping[StateKey, StateEntry] = field(default_factory=dict)
    bot_membership: str = "join"

    def get(self, event_type: str, state_key: str = "") -> StateEntry | None:
        return self.state.get((event_type, state_key))

    def of_type(self, event_type: str) -> Mapping[str, StateEntry]:
        """state_key → event for one type. A scan, not a stored index: the planner reads at most
        one type per room once, and an index kept on every snapshot cost more memory than it saved."""
        return {key: event for (t, key), event in self.state.items() if t == event_type}

    @property
    def room_version(self) -> str:
        return create_room_version(self.create.content if self.create else None)

    @property
    def power_levels(self) -> Mapping[str, Any] | None:
        event = self.get(POWER_LEVELS_TYPE)
        return event.content if event and isinstance(event.content, Mapping) else None

    def membership(self, user_id: str) -> str | None:
        """`members.get(user_id)` without building `members`: one lookup."""
        event = self.state.get((MEMBER_TYPE, user_id))
        if event is None:
            return None
        content = event.content
        membership = content.get("membership") if isinstance(content, dict) else None
        return membership if isinstance(membership, str) else None

    @cached_property
    def members(self) -> Mapping[str, str]:
        """mxid → membership ('join', 'invite', 'leave', 'ban', 'knock')."""
        result: dict[str, str] = {}
        for state_key, event in self.of_type(MEMBER_TYPE).items():
            membership = (
                event.content.get("membership") if isinstance(event.content, dict) else None
            )
            if isinstance(membership, str):
                result[state_key] = membership
        return result


@dataclass(frozen=True)
class Snapshot:
    bot_id: str
    server_name: str
    rooms: Mapping[str, RoomSnapshot]
    access: AccessDecisions | None = None
    # Joined rooms whose state could not be read: their links are left alone, never "dangling".
    unreadable: frozenset[str] = frozenset()

    def with_room(self, room: RoomSnapshot) -> Snapshot:
        """This snapshot with one room re-read (how a live event's room is re-reconciled)."""
        return replace(self, rooms={**self.rooms, room.room_id: room})


# ---------------------------------------------------------------------------
# cache rows: what the plugin DB holds; the planner returns the desired set in the same shape

BotMembership = Literal["join", "lost"]


@dataclass(frozen=True)
class RoomRecord:
    room_id: str
    kind: RoomKind
    owner: str
    binding: Binding | None = None  # working rooms; None for a Space
    bot_membership: BotMembership = "join"
    owner_membership: str | None = None  # None: the owner never had a membership event here
    replaced_by: str | None = None  # upgraded working room, or a Space merged into another
    degraded: bool = False  # the bot lacks the power to maintain this room

    @property
    def routable(self) -> bool:
        """Messages here go to the agent."""
        return (
            self.binding is not None
            and not self.binding.archived
            and self.bot_membership == "join"
            and self.replaced_by is None
            and self.binding.platform_chat_id is not None
        )


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    space_id: str | None = None  # the canonical Space, None when the user has none usable
    access: str | None = None  # 'approved' | 'blocked' from account data, None when undecided
    space_membership: str | None = None


@dataclass(frozen=True)
class CacheView:
    users: Mapping[str, UserRecord] = field(default_factory=dict)
    rooms: Mapping[str, RoomRecord] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# write actions


@dataclass(frozen=True)
class SetState:
    room_id: str
    type: str
    state_key: str
    content: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class Invite:
    room_id: str
    user_id: str
    reason: str


Action = SetState | Invite
