"""Apply: write the plan's repairs to Matrix (only what still differs), then rebuild the cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.types import EventType, RoomID, UserID

from .. import layout
from ..chats import WorkingRoom
from ..matrix import GatewayError, NotFound
from ..store.chats import Chat
from ..store.rooms import Room
from ..store.users import User
from .model import Invite, RoomRecord, SetState, Snapshot
from .plan import Plan

if TYPE_CHECKING:
    from ..app import Surfaces


@dataclass
class ApplyResult:
    writes: int = 0
    skipped: int = 0  # already as planned when re-read
    failed: list[str] = field(default_factory=list)


async def _current_state(app: Surfaces, action: SetState) -> Mapping[str, Any] | None:
    try:
        return await app.gateway.read(
            "re-read state before writing",
            lambda: app.client.api.request(
                Method.GET,
                Path.v3.rooms[action.room_id].state[action.type][action.state_key],
            ),
        )
    except NotFound:
        return None


async def write_plan(app: Surfaces, plan: Plan) -> ApplyResult:
    """Each write is re-checked against Matrix first, so a repeated run writes nothing."""
    result = ApplyResult()
    for action in plan.writes:
        try:
            if isinstance(action, SetState):
                current = await _current_state(app, action)
                if current is not None and dict(current) == dict(action.content):
                    result.skipped += 1
                    continue
                await app.gateway.write(
                    f"repair {action.type} in {action.room_id}",
                    lambda a=action: app.client.send_state_event(
                        RoomID(a.room_id),
                        EventType.find(a.type, EventType.Class.STATE),
                        dict(a.content),
                        state_key=a.state_key,
                    ),
                )
            elif isinstance(action, Invite):
                await app.gateway.write(
                    f"invite {action.user_id} to {action.room_id}",
                    lambda a=action: app.client.invite_user(RoomID(a.room_id), UserID(a.user_id)),
                )
            result.writes += 1
            app.log.info("Reconciliation: %s (%s)", _describe(action), action.reason)
        except GatewayError as e:
            result.failed.append(f"{_describe(action)}: {e}")
            app.log.warning("Reconciliation write failed: %s: %s", _describe(action), e)
    return result


def _describe(action: SetState | Invite) -> str:
    if isinstance(action, Invite):
        return f"invite {action.user_id} to {action.room_id}"
    return f"set {action.type}[{action.state_key!r}] in {action.room_id}"


def _order_of(snapshot: Snapshot, record: RoomRecord) -> str | None:
    space = snapshot.rooms.get(record.space_id or "")
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


async def rebuild_cache(app: Surfaces, snapshot: Snapshot, plan: Plan) -> list[WorkingRoom]:
    """Replace the cache with the planned rows in one transaction; returns the working rooms."""
    cached_users = {u.user_id: u for u in await app.stores.users.list_all(include_missing=True)}
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
        order = _order_of(snapshot, record) if record.kind == "working" else None
        rooms.append(
            Room(
                room_id=record.room_id,
                kind=record.kind,
                owner=record.owner,
                space_id=record.space_id,
                agent=record.agent,
                title=record.title,
                platform_chat_id=record.platform_chat_id,
                system_prompt=record.system_prompt,
                archived=record.archived,
                order_key=order,
                bot_membership=record.bot_membership,
                owner_membership=record.owner_membership,
                last_activity_ms=None,  # None keeps the stored value
            )
        )
        if record.kind == "working" and record.platform_chat_id:
            chats.append(
                Chat(
                    platform_chat_id=record.platform_chat_id,
                    room_id=record.room_id,
                    agent=record.agent,
                    created_ms=0,
                )
            )
    await app.stores.replace_topology(users, rooms, chats, memories=_memories(snapshot, plan))
    stored = {r.room_id: r for r in await app.stores.rooms.list_all(kind="working")}
    for record in plan.rooms.values():
        # Routed rooms and archived ones still joined (commands there say they are archived).
        keep = record.routable or (record.archived and record.bot_membership == "join")
        if record.kind == "working" and keep:
            row = stored.get(record.room_id)
            if row is not None and row.platform_chat_id:
                working.append(WorkingRoom.from_row(row))
    return working
