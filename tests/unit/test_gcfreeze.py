"""How the runner calls the planner: the heap frozen for GC during the call, and only then."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

from surfaces_plugin.reconcile.gcfreeze import plan_with_gc_frozen
from surfaces_plugin.reconcile.model import CacheView, Snapshot
from surfaces_plugin.reconcile.plan import plan


def _snapshot() -> Snapshot:
    return Snapshot("@bot:hs", "hs", {})


def test_the_heap_is_frozen_during_the_call_and_thawed_after() -> None:
    seen: list[int] = []

    def new_chat_id(room_id: str) -> str:
        return room_id

    class Rooms(dict[str, Any]):  # the planner lists the rooms: look at the GC state from there
        def __iter__(self) -> Iterator[str]:
            seen.append(gc.get_freeze_count())
            return super().__iter__()

    snapshot = Snapshot("@bot:hs", "hs", Rooms())
    result = plan_with_gc_frozen(snapshot, CacheView(), new_chat_id)
    assert result == plan(_snapshot(), CacheView(), new_chat_id)
    assert seen and all(count > 0 for count in seen)
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_objects_someone_else_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        plan_with_gc_frozen(_snapshot(), CacheView(), lambda room_id: room_id)
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_plan_itself_leaves_the_collector_alone() -> None:
    assert gc.isenabled()
    plan(_snapshot(), CacheView(), lambda room_id: room_id)
    assert gc.isenabled() and gc.get_freeze_count() == 0
