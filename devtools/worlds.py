"""Synthetic Matrix worlds for the reconciliation planner: snapshots in the contract's layout,
and `apply_to_snapshot`, what Matrix looks like once a plan's writes land (those Synapse would
accept: power levels and the bot's membership are honoured, see `apply_writes`).

One builder for the planner's unit tests (small hand-made worlds, tests/unit/test_plan.py) and
for bench.planner_scale (tens of thousands of rooms, built with `created`, which gives a room the
state Synapse gives it for one of our createRoom requests). Pure data: no server, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from mautrix.types import RoomCreatePreset

from surfaces_plugin import layout
from surfaces_plugin.layout import AccessDecisions, Binding
from surfaces_plugin.reconcile.model import Action, RoomSnapshot, SetState, Snapshot, StateEntry
from surfaces_plugin.reconcile.plan import Plan, invite_level, state_level, user_level

BOT = "@bot:hs"
HS = "hs"
ALICE = "@alice:hs"

# What Synapse's presets put in a new room (besides create, members and power levels).
_PRESET_STATE: Mapping[RoomCreatePreset, tuple[tuple[str, dict[str, Any]], ...]] = {
    RoomCreatePreset.PRIVATE: (
        ("m.room.join_rules", {"join_rule": "invite"}),
        ("m.room.history_visibility", {"history_visibility": "shared"}),
        ("m.room.guest_access", {"guest_access": "can_join"}),
    ),
}


class World:
    """A tiny Matrix. `rooms` holds immutable `RoomSnapshot`s (every change replaces the room),
    so a snapshot taken earlier stays as it was; tests may edit `rooms`, `access` and
    `unreadable` directly."""

    def __init__(self, version: str = "12", *, bot: str = BOT, server: str = HS) -> None:
        self.version = version
        self.bot = bot
        self.server = server
        self.rooms: dict[str, RoomSnapshot] = {}
        self.access: AccessDecisions | None = None
        self.unreadable: frozenset[str] = frozenset()

    def room(
        self,
        room_id: str,
        creation: dict[str, Any],
        *,
        creator: str | None = None,
        ts: int = 0,
        version: str | None = None,
        members: dict[str, str] | None = None,
        power_levels: dict[str, Any] | None = None,
    ) -> str:
        """A room with a create event, power levels (ours unless given) and memberships: the
        bot joined, plus `members` (user → membership, each sent by that user)."""
        creator = creator or self.bot
        version = version or self.version
        content = {**creation, "room_version": version}
        create = StateEntry("m.room.create", "", creator, content, f"$create-{room_id}", ts)
        self.rooms[room_id] = RoomSnapshot(room_id, create, {("m.room.create", ""): create})
        pl = layout.power_levels(self.bot, version) if power_levels is None else power_levels
        self.put(room_id, "m.room.power_levels", "", pl, sender=creator)
        for user, membership in {self.bot: "join", **(members or {})}.items():
            self.put(room_id, "m.room.member", user, {"membership": membership}, sender=user)
        return room_id

    def space(self, room_id: str, owner: str = ALICE, *, ts: int = 0, **kw: Any) -> str:
        kw.setdefault("members", {owner: "join"})
        return self.room(room_id, layout.space_creation_content(owner), ts=ts, **kw)

    def working(
        self,
        room_id: str,
        space_id: str,
        owner: str = ALICE,
        *,
        pcid: str | None = "default",
        link: bool = True,
        ts: int = 0,
        members: dict[str, str] | None = None,
        **binding: Any,
    ) -> str:
        members = {owner: "join"} if members is None else members
        self.room(room_id, layout.working_creation_content(owner), ts=ts, members=members)
        b = Binding(
            owner=owner,
            space_id=space_id,
            agent=binding.pop("agent", "echo"),
            title=binding.pop("title", f"Chat {room_id}"),
            platform_chat_id=f"chat-{room_id}" if pcid == "default" else pcid,
            **binding,
        )
        self.put(room_id, layout.BINDING_TYPE, "", b.to_content())
        self.put(room_id, "m.space.parent", space_id, layout.space_parent_content(self.server))
        if link and not b.archived and space_id in self.rooms:
            self.link(space_id, room_id, layout.order_key(ts))
        return room_id

    def created(self, room_id: str, request: Mapping[str, Any], owner: str, *, ts: int) -> str:
        """The room Synapse makes from one of our createRoom requests
        (`layout.space_create_request`, `layout.working_room_create_request`), sent by the bot,
        once the owner has accepted the invite."""
        version = request["room_version"]
        creation = dict(request["creation_content"])
        if version.isdigit() and int(version) < 11:  # v11 dropped `creator` (implicit)
            creation["creator"] = self.bot
        self.room(
            room_id,
            creation,
            ts=ts,
            version=version,
            members={owner: "join"},
            power_levels=request["power_level_override"],
        )
        for event_type, content in _PRESET_STATE[RoomCreatePreset(request["preset"])]:
            self.put(room_id, event_type, "", content)
        if request.get("name"):
            self.put(room_id, "m.room.name", "", {"name": request["name"]})
        for event in request["initial_state"]:
            self.put(room_id, event["type"], event["state_key"], event["content"])
        return room_id

    def link(self, space_id: str, room_id: str, order: str = "0001", **kw: Any) -> None:
        content = layout.space_child_content(self.server, order)
        self.put(space_id, "m.space.child", room_id, content, **kw)

    def put(
        self, room_id: str, type_: str, key: str, content: Any, *, sender: str | None = None
    ) -> None:
        room = self.rooms[room_id]
        event = StateEntry(
            type_, key, sender or self.bot, content, f"${type_}-{key}-{len(room.state)}"
        )
        self.rooms[room_id] = replace(room, state={**room.state, (type_, key): event})

    def drop(self, room_id: str, type_: str, key: str = "") -> None:
        room = self.rooms[room_id]
        state = {k: v for k, v in room.state.items() if k != (type_, key)}
        self.rooms[room_id] = replace(room, state=state)

    def kick_bot(self, room_id: str, *, by: str = ALICE) -> None:
        self.rooms[room_id] = replace(self.rooms[room_id], bot_membership="leave")
        self.put(room_id, "m.room.member", self.bot, {"membership": "leave"}, sender=by)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.bot, self.server, dict(self.rooms), self.access, self.unreadable)


@dataclass(frozen=True)
class Applied:
    snapshot: Snapshot  # as the next inventory would read it
    refused: tuple[tuple[Action, str], ...]  # (write, why Synapse would refuse it), in order


def refusal(room: RoomSnapshot | None, bot: str, action: Action) -> str | None:
    """Why Synapse would refuse this write from the bot, given the room as it is now; None if
    it lands. What the planner's writes need (not the whole auth rules: no power-level edits,
    no membership changes but invites): the bot must be joined, and its power level (room v12+:
    creators unlimited) must reach the event type's level, or the invite level for an invite,
    whose target must not be joined or banned already."""
    if room is None:
        return "no such room"
    if room.bot_membership != "join":
        return f"bot membership is {room.bot_membership}"
    have = user_level(room, bot)
    if isinstance(action, SetState):
        need = state_level(room, action.type)
        what = action.type
    else:
        target = room.membership(action.user_id)
        if target in ("join", "ban"):
            return f"{action.user_id} is already {target}"
        need = invite_level(room)
        what = "invite"
    return None if have >= need else f"{what} needs level {need}, the bot has {have}"


def apply_writes(snapshot: Snapshot, writes: Plan | Iterable[Action]) -> Applied:
    """The bot's writes applied in order, each checked against the room as the earlier writes
    left it; refused ones change nothing and are returned."""
    actions = writes.writes if isinstance(writes, Plan) else tuple(writes)
    rooms = dict(snapshot.rooms)
    refused: list[tuple[Action, str]] = []
    for action in actions:
        room = rooms.get(action.room_id)
        why = refusal(room, snapshot.bot_id, action)
        if why is not None:
            refused.append((action, why))
            continue
        assert room is not None
        if isinstance(action, SetState):
            key = (action.type, action.state_key)
            event = StateEntry(action.type, action.state_key, snapshot.bot_id, dict(action.content))
        else:
            key = ("m.room.member", action.user_id)
            event = StateEntry(
                "m.room.member", action.user_id, snapshot.bot_id, {"membership": "invite"}
            )
        rooms[action.room_id] = replace(room, state={**room.state, key: event})
    return Applied(replace(snapshot, rooms=rooms), tuple(refused))


def apply_to_snapshot(snapshot: Snapshot, writes: Plan | Iterable[Action]) -> Snapshot:
    """The snapshot after the bot's writes, as the next inventory would read it; writes Synapse
    would refuse (`apply_writes`) are left out."""
    return apply_writes(snapshot, writes).snapshot
