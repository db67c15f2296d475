"""How the runner calls the pure planner: with the objects that existed before it frozen for GC.

Kept apart from plan.py (which stays pure) so the runner and bench.planner_scale share it.
"""

from __future__ import annotations

import gc

from .model import CacheView, Snapshot
from .plan import NewChatId, Plan, plan


def plan_with_gc_frozen(snapshot: Snapshot, cache: CacheView, new_chat_id: NewChatId) -> Plan:
    """`plan()` with everything allocated before it (the snapshot just read, the cache, the rest
    of maubot) moved out of the collector's reach for the call: the planner's allocations can
    trigger a full cyclic-GC pass, which at 50,000 rooms walks millions of snapshot objects and
    costs about as much as the planning itself. The collector keeps running on the planner's own
    objects. `plan()` never awaits, so no other task runs while the heap is frozen; if something
    else froze objects (gc.freeze() is process-wide), we leave the heap alone rather than thaw
    theirs."""
    if gc.get_freeze_count():
        return plan(snapshot, cache, new_chat_id)
    gc.freeze()
    try:
        return plan(snapshot, cache, new_chat_id)
    finally:
        gc.unfreeze()
