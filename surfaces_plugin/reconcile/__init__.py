"""Reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache)."""

from .model import (
    Action,
    CacheView,
    Invite,
    RoomRecord,
    RoomSnapshot,
    SetState,
    Snapshot,
    StateEvent,
    UserRecord,
)
from .plan import Plan, Report, apply_to_snapshot, plan

__all__ = [
    "Action",
    "CacheView",
    "Invite",
    "Plan",
    "Report",
    "RoomRecord",
    "RoomSnapshot",
    "SetState",
    "Snapshot",
    "StateEvent",
    "UserRecord",
    "apply_to_snapshot",
    "plan",
]
