"""Apply: write the plan's repairs to Matrix (only what still differs), then rebuild the cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mautrix.api import Method, Path
from mautrix.types import EventType, RoomID, UserID

from .. import layout
from ..matrix import GatewayError, MatrixIO, NotFound
from ..rooms import WorkingRoom
from ..store import Stores
from ..store.chats import Chat
from ..store.rooms import Room
from ..store.users import User
from .model import Invite, RoomRecord, SetState, Snapshot
from .plan import Plan


@dataclass
class ApplyResult:
    writes: int = 0
    failed: list[str] = field(default_factory=list)


async def _current_state(io: MatrixIO, action: SetState) -> Mapping[str, Any] | None:
    try:
        return await io.gateway.read(
            "re-read state before writing",
            lambda: io.client.api.request(
                Method.GET,
                Path.v3.rooms[action.room_id].state[action.type][action.state_key],
            ),
        )
    except NotFound:
        return None


async def write_plan(io: MatrixIO, plan: Plan) -> ApplyResult:
    """Each write is re-checked against Matrix first, so a repeated run writes nothing."""
    result = ApplyResult()
    client = io.client
    for action in plan.writes:
        try:
            if isinstance(action, SetState):
                current = await _current_state(io, action)
                if current is not None and dict(current) == dict(action.content):
                    continue  # already as planned
                await io.gateway.write(
                    f"repair {action.type} in {action.room_id}",
                    lambda a=action: client.send_state_event(
                        RoomID(a.room_id),
                        EventType.find(a.type, EventType.Class.STATE),
                        dict(a.content),
                        state_key=a.state_key,
                    ),
                )
            elif isinstance(action, Invite):
                await io.gateway.write(
                    f"invite {action.user_id} to {action.room_id}",
                    lambda a=action: client.invite_user(RoomID(a.room_id), UserID(a.user_id)),
                )
            result.writes += 1
            io.log.info("Reconciliation: %s (%s)", _describe(action), action.reason)
        except GatewayError as e:
            result.failed.append(f"{_describe(action)}: {e}")
            io.log.warning("Reconciliation write failed: %s: %s", _describe(action), e)
    return result


def _describe(action: SetState | Invite) -> str:
    if isinstance(action, Invite):
        return f"invite {action.user_id} to {action.room_id}"
    return f"set {action.type}[{action.state_key!r}] in {action.room_id}"


def _order_of(snapshot: Snapshot, record: RoomRecord) -> str | None:
    space = snapshot.rooms.get(record.binding.space_id if record.binding else "")
    link = space.get(layout.SPACE_CHILD_TYPE, record.room_id) if space else None
    parsed = layout.parse_space_child(link.content) if link else None
    return parsed.order if parsed else None


def _memories(snapshot: Snapshot, plan: Plan) -> dict[str, tuple[str, ...]]:
    notes: dict[str, tuple[str, ...]] = {}
    for user in plan.users.values():
        space = snapshot.rooms.get(user.space_id or "")
        event = space.get(layout.MEMORY_TYPE) if space else None
        if event is not None and event.sender == snapshot.bot_id:
            memory = layout.parse_memory(event.content)
            if memory is not None:
                notes[user.user_id] = memory.notes
    return notes


async def rebuild_cache(stores: Stores, snapshot: Snapshot, plan: Plan) -> list[WorkingRoom]:
    """Replace the cache with the planned rows in one transaction; returns the working rooms."""
    cached_users = {u.user_id: u for u in await stores.users.list_all(include_missing=True)}
    # Activity is only known to the cache; the rebuild keeps it (`RoomStore.upsert`).
    activity = {
        r.room_id: r.last_activity_ms
        for r in await stores.rooms.list_all(kind="working", include_missing=True)
    }
    users = []
    for record in plan.users.values():
        old = cached_users.get(record.user_id)
        access = record.access
        if access is None and old is not None and old.access_state == "pending":
            access = "pending"  # a request waiting for an admin is only known to the cache
        users.append(
            User(
                user_id=record.user_id,
                space_id=record.space_id,
                access_state=access,
                access_by=old.access_by if old else None,
                access_ts=old.access_ts if old else None,
                dm_room_id=None,  # None keeps the stored DM
            )
        )
    rooms: list[Room] = []
    chats: list[Chat] = []
    working: list[WorkingRoom] = []
    for record in plan.rooms.values():
        if record.replaced_by is not None:
            continue  # an upgraded room lives on as its successor; the old row goes missing
        binding = record.binding
        order = _order_of(snapshot, record) if binding is not None else None
        rooms.append(
            Room(
                room_id=record.room_id,
                kind=record.kind,
                owner=record.owner,
                binding=binding,
                order_key=order,
                bot_membership=record.bot_membership,
                owner_membership=record.owner_membership,
                last_activity_ms=None,  # None keeps the stored value
            )
        )
        if binding is None or not binding.platform_chat_id:
            continue
        chats.append(Chat(binding.platform_chat_id, record.room_id, binding.agent, created_ms=0))
        # Routed rooms and archived ones still joined (commands there say they are archived).
        if record.routable or (binding.archived and record.bot_membership == "join"):
            working.append(
                WorkingRoom(record.room_id, binding, order or "", activity.get(record.room_id))
            )
    await stores.replace_topology(users, rooms, chats, memories=_memories(snapshot, plan))
    return working
