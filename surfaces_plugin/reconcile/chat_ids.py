"""Platform conversation ids for a plan: the planner mints ids, applying asks the platform.

The planner stays pure, so every fresh `platform_chat_id` it needs comes from the id factory
(`Plan.fresh_chat_ids`). When a room's backend keeps conversations on the platform
(`Features.server_state`), that minted id is only a placeholder: before anything is written,
the backend creates the conversation and its id replaces the placeholder in the binding write
and in the cache row. When the platform fails, the room keeps no id this run (not routed, the
binding written without one) and the next run asks again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from .. import layout
from ..backends import BackendError
from ..history import not_created
from ..layout import Binding
from .model import Action, RoomRecord, SetState
from .plan import Plan

# room id, its planned binding → the platform's id, or None when the backend holds nothing
# (the planned id stands). Raises BackendError when the platform fails.
CreateChat = Callable[[str, Binding], Awaitable[str | None]]


@dataclass
class ChatIdResult:
    plan: Plan
    created: list[str] = field(default_factory=list)  # rooms given a platform-held conversation
    failed: list[str] = field(default_factory=list)  # "room: why", for the report


async def obtain_chat_ids(plan: Plan, create: CreateChat, log: logging.Logger) -> ChatIdResult:
    """`plan` with each minted id the platform must issue replaced by the platform's id."""
    result = ChatIdResult(plan)
    chosen: dict[str, str | None] = {}
    for room_id in sorted(plan.fresh_chat_ids):
        record = plan.rooms.get(room_id)
        if record is None or record.binding is None:
            continue
        try:
            platform_id = await create(room_id, record.binding)
        except BackendError as e:
            log.warning("Reconciliation: no conversation for %s from the platform: %s", room_id, e)
            result.failed.append(f"{room_id}: {not_created(record.binding.agent, e)}")
            chosen[room_id] = None
            continue
        if platform_id is not None:
            chosen[room_id] = platform_id
            result.created.append(room_id)
    if chosen:
        result.plan = _with_chat_ids(plan, chosen)
    return result


def _with_chat_ids(plan: Plan, chosen: Mapping[str, str | None]) -> Plan:
    rooms = dict(plan.rooms)
    for room_id, pcid in chosen.items():
        rooms[room_id] = _record_with(rooms[room_id], pcid)
    writes = tuple(_write_with(action, chosen) for action in plan.writes)
    return dataclasses.replace(plan, writes=writes, rooms=rooms)


def _record_with(record: RoomRecord, pcid: str | None) -> RoomRecord:
    assert record.binding is not None
    return dataclasses.replace(
        record, binding=dataclasses.replace(record.binding, platform_chat_id=pcid)
    )


def _write_with(action: Action, chosen: Mapping[str, str | None]) -> Action:
    if not (
        isinstance(action, SetState)
        and action.type == layout.BINDING_TYPE
        and action.room_id in chosen
    ):
        return action
    binding = layout.parse_binding(action.content)
    assert binding is not None  # the planner wrote it
    pcid = chosen[action.room_id]
    content = dataclasses.replace(binding, platform_chat_id=pcid).to_content()
    return dataclasses.replace(action, content=content)
