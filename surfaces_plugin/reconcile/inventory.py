"""Inventory: read what Matrix holds (joined rooms, their full state, access decisions) as plain data."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from mautrix.api import Method, Path

from .. import layout
from ..matrix import GatewayError, MatrixIO, NotFound
from ..store import Stores
from ..store.rooms import Room
from ..store.users import User
from .model import CacheView, RoomRecord, RoomSnapshot, Snapshot, StateEntry, UserRecord


def state_entry(raw: Mapping[str, Any]) -> StateEntry | None:
    """A state event from the client-server JSON; None when its shape is not a state event."""
    event_type, state_key, sender = raw.get("type"), raw.get("state_key"), raw.get("sender")
    content = raw.get("content")
    if not (isinstance(event_type, str) and isinstance(state_key, str) and isinstance(sender, str)):
        return None
    ts = raw.get("origin_server_ts")
    return StateEntry(
        type=event_type,
        state_key=state_key,
        sender=sender,
        content=content if isinstance(content, dict) else {},
        event_id=str(raw.get("event_id", "")),
        origin_server_ts=ts if isinstance(ts, int) else 0,
    )


def room_snapshot(room_id: str, raw_state: list[Any]) -> RoomSnapshot:
    state = {}
    for raw in raw_state:
        if isinstance(raw, Mapping) and (event := state_entry(raw)) is not None:
            state[(event.type, event.state_key)] = event
    return RoomSnapshot(room_id=room_id, create=state.get((layout.CREATE_TYPE, "")), state=state)


async def read_room(io: MatrixIO, room_id: str) -> RoomSnapshot | None:
    """One room's full state; None when it cannot be read (logged)."""
    try:
        raw = await io.gateway.read(
            "read room state",
            lambda: io.client.api.request(Method.GET, Path.v3.rooms[room_id].state),
        )
    except GatewayError as e:
        io.log.warning("Reconciliation could not read %s: %s", room_id, e)
        return None
    return room_snapshot(room_id, raw if isinstance(raw, list) else [])


async def read_snapshot(io: MatrixIO, concurrency: int) -> Snapshot:
    gateway, client = io.gateway, io.client
    joined = await gateway.read("list joined rooms", client.get_joined_rooms)
    slots = asyncio.Semaphore(concurrency)
    rooms: dict[str, RoomSnapshot] = {}
    unreadable: set[str] = set()

    async def read(room_id: str) -> None:
        async with slots:
            room = await read_room(io, room_id)
        if room is None:
            unreadable.add(room_id)
        else:
            rooms[room_id] = room

    await asyncio.gather(*(read(str(room_id)) for room_id in joined))
    try:
        access_content = await gateway.read(
            "read access decisions", lambda: client.get_account_data(layout.ACCESS)
        )
    except NotFound:
        access_content = None
    return Snapshot(
        bot_id=io.bot_id,
        server_name=io.server_name,
        rooms=rooms,
        access=layout.parse_access(access_content) if access_content else None,
        unreadable=frozenset(unreadable),
    )


def cache_view(users: list[User], rooms: list[Room]) -> CacheView:
    return CacheView(
        users={
            u.user_id: UserRecord(
                user_id=u.user_id,
                space_id=u.space_id,
                access=u.access_state if u.access_state in layout.ACCESS_STATES else None,
            )
            for u in users
        },
        rooms={
            r.room_id: RoomRecord(
                room_id=r.room_id,
                kind=r.kind,
                owner=r.owner,
                binding=r.binding,
                bot_membership="lost" if r.bot_membership == "lost" else "join",
                owner_membership=r.owner_membership,
            )
            for r in rooms
            if not r.missing
        },
    )


async def read_cache(stores: Stores) -> CacheView:
    users = await stores.users.list_all(include_missing=True)
    rooms = await stores.rooms.list_all()
    return cache_view(users, rooms)
