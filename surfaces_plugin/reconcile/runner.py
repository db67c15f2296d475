"""Runs reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache).

Level-triggered and idempotent: a second run in a row finds nothing to write.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .. import layout
from .apply import rebuild_cache, write_plan
from .gcfreeze import plan_with_gc_frozen
from .inventory import read_cache, read_room, read_snapshot
from .model import Snapshot
from .plan import Plan, Report

if TYPE_CHECKING:
    from ..app import Surfaces

REPORT_KEY = "reconciliation.last_report"
MAX_DIRTY_ROUNDS = 3  # rooms that keep changing are left to the next run


@dataclass
class RunReport:
    reason: str
    started_ms: int
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    writes: int = 0
    dry_run: bool = False

    def to_markdown(self) -> str:
        lines = [f"**Reconciliation** ({self.reason}): {self.seconds:.2f} s, {self.writes} writes"]
        if self.dry_run:
            lines[0] += " (dry run: nothing written)"
        lines += [f"- {name}: {value}" for name, value in self.counts.items()]
        if self.ignored:
            lines.append(f"- ignored ({len(self.ignored)}):")
            lines += [f"  - {item}" for item in self.ignored[:20]]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Reconciler:
    def __init__(self, app: Surfaces) -> None:
        self.app = app
        self.last: RunReport | None = None
        self._lock = asyncio.Lock()
        self._periodic: asyncio.Task[None] | None = None
        self._running = False
        self._dirty: set[str] = set()

    async def run(self, reason: str) -> RunReport:
        async with self._lock:
            app = self.app
            started = time.monotonic()
            dry_run = app.settings.reconciliation.dry_run
            report = RunReport(reason=reason, started_ms=int(time.time() * 1000), dry_run=dry_run)
            self._dirty = set()
            self._running = True
            try:
                snapshot = await read_snapshot(app, app.settings.reconciliation.concurrency)
                result = await self._plan_and_apply(snapshot, report)
                # Rooms changed by others while we read them: read again, plan again (T13).
                for _ in range(MAX_DIRTY_ROUNDS):
                    dirty, self._dirty = self._dirty, set()
                    if not dirty:
                        break
                    for room_id in sorted(dirty):
                        room = await read_room(app, room_id)
                        if room is not None:
                            snapshot = snapshot.with_room(room)
                    report.counts["rooms re-read after live changes"] = len(dirty) + (
                        report.counts.get("rooms re-read after live changes", 0)
                    )
                    result = await self._plan_and_apply(snapshot, report)
            finally:
                self._running = False
            _count(report, result.report)
            report.seconds = time.monotonic() - started
            self.last = report
            await self.app.stores.kv.set_json(REPORT_KEY, report.to_json())
            self.app.log.info("Reconciliation done: %s", report.to_markdown().replace("\n", "; "))
            return report

    async def _plan_and_apply(self, snapshot: Snapshot, report: RunReport) -> Plan:
        app = self.app
        # GC frozen for the call: a full GC pass over the fresh snapshot is ~1 s at 50,000 rooms.
        result = plan_with_gc_frozen(
            snapshot, await read_cache(app), self._chat_id_factory(snapshot)
        )
        if report.dry_run:
            report.counts["writes planned"] = len(result.writes)
            await app.chats.load_from_cache()
            return result
        applied = await write_plan(app, result)
        report.writes += applied.writes
        report.ignored += [f"write failed: {item}" for item in applied.failed]
        app.chats.load(await rebuild_cache(app, snapshot, result))
        return result

    def mark_dirty(self, room_id: str) -> None:
        """A room's state changed live; if a run is reading Matrix now, it reads the room again."""
        if self._running:
            self._dirty.add(room_id)

    def _chat_id_factory(self, snapshot: Snapshot):  # noqa: ANN202 - plan's NewChatId
        """Fresh platform_chat_ids named after the room's backend, like Backend.create_chat."""
        settings = self.app.settings

        def new_chat_id(room_id: str) -> str:
            room = snapshot.rooms.get(room_id)
            event = room.get(layout.BINDING_TYPE) if room else None
            binding = layout.parse_binding(event.content) if event else None
            agent = settings.agent(binding.agent) if binding else None
            prefix = agent.backend if agent else "chat"
            return f"{prefix}-{uuid.uuid4().hex}"

        return new_chat_id

    def note_catch_up(self, messages: int, rooms: int, seconds: float) -> None:
        """Catch-up runs after the start-up reconciliation; its result joins that report."""
        self.app.log.info(
            "Catch-up: %d missed messages to answer in %d rooms (%.2f s)", messages, rooms, seconds
        )
        if self.last is not None:
            self.last.counts["messages caught up"] = messages

    def schedule_periodic(self) -> None:
        """(Re)arm the periodic run from the current config; 0 minutes turns it off."""
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        if self.app.settings.reconciliation.interval_minutes > 0:
            self._periodic = self.app.spawn(self._every(), name="periodic reconciliation")

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.app.settings.reconciliation.interval_minutes * 60)
            try:
                await self.run(reason="periodic")
            except Exception:
                self.app.log.exception("Periodic reconciliation failed; the next one will retry")

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()


def _count(report: RunReport, planned: Report) -> None:
    report.counts.update(
        {
            "spaces": planned.spaces,
            "working rooms": planned.working_rooms,
            "other rooms": planned.foreign,
            "adopted": len(planned.adopted),
            "links added": len(planned.links_added),
            "links removed": len(planned.links_removed),
            "parents repaired": len(planned.parents_repaired),
            "bindings reverted": len(planned.bindings_reverted),
            "platform_chat_ids backfilled": len(planned.backfilled),
            "duplicate chat ids resolved": len(planned.duplicates_resolved),
            "spaces merged": len(planned.spaces_merged),
            "upgrades followed": len(planned.upgrades_followed),
            "degraded": len(planned.degraded),
            "lost": len(planned.lost),
            "missing": len(planned.missing),
        }
    )
    report.ignored += [f"{room}: {why}" for room, why in planned.ignored]
