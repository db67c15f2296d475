"""Applying a plan's minted ids: the platform's ids replace them, a refusal leaves no id."""

from __future__ import annotations

import logging

from devtools.worlds import ALICE, World
from surfaces_plugin import layout
from surfaces_plugin.backends import BackendError, ErrorKind
from surfaces_plugin.reconcile.chat_ids import obtain_chat_ids
from surfaces_plugin.reconcile.model import CacheView, SetState
from surfaces_plugin.reconcile.plan import Plan, plan

LOG = logging.getLogger("test")


def world_plan() -> Plan:
    w = World()
    w.space("!sa", ALICE, ts=1)
    w.working("!held", "!sa", pcid=None, ts=2, agent="gpt")
    w.working("!local", "!sa", pcid=None, ts=3, agent="echo")
    w.working("!down", "!sa", pcid=None, ts=4, agent="gpt")
    w.working("!fine", "!sa", ts=5)
    return plan(w.snapshot(), CacheView(), lambda room_id: f"pending-{room_id}")


def binding_write(p: Plan, room_id: str) -> dict:
    [write] = [
        w for w in p.writes
        if isinstance(w, SetState) and w.room_id == room_id and w.type == layout.BINDING_TYPE
    ]
    return dict(write.content)


async def test_platform_ids_replace_minted_ones_and_a_refusal_leaves_none() -> None:
    asked: list[tuple[str, str]] = []

    async def create(room_id: str, binding: layout.Binding) -> str | None:
        asked.append((room_id, binding.agent))
        if room_id == "!down":
            raise BackendError(ErrorKind.UNREACHABLE, "connection refused")
        return None if binding.agent == "echo" else "conv_7"

    planned = world_plan()
    result = await obtain_chat_ids(planned, create, LOG)
    p = result.plan
    assert asked == [("!down", "gpt"), ("!held", "gpt"), ("!local", "echo")]
    assert result.created == ["!held"]
    assert result.failed and result.failed[0].startswith("!down: ")
    assert binding_write(p, "!held")["platform_chat_id"] == "conv_7"
    assert p.rooms["!held"].binding.platform_chat_id == "conv_7"
    assert binding_write(p, "!local")["platform_chat_id"] == "pending-!local"  # planned id stands
    assert "platform_chat_id" not in binding_write(p, "!down")
    assert p.rooms["!down"].binding.platform_chat_id is None and not p.rooms["!down"].routable
    assert p.rooms["!fine"] == planned.rooms["!fine"]
    assert len(p.writes) == len(planned.writes)
