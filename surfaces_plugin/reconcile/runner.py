"""Runs reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache).

Level-triggered and idempotent: a second run in a row finds nothing to write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import layout
from ..backends import BackendRegistry, ChatMessage, new_chat_id
from ..config import Settings
from ..history import stored_seed
from ..matrix import MatrixIO
from ..rooms import RoomDirectory
from ..store import Stores
from .apply import rebuild_cache, write_plan
from .chat_ids import obtain_chat_ids
from .gcfreeze import plan_with_gc_frozen
from .inventory import read_cache, read_room, read_snapshot
from .model import CacheView, Snapshot
from .plan import NewChatId, Plan, Report

# Creates a user's first working room in their Space; True when it did.
FinishOnboarding = Callable[[str], Awaitable[bool]]
MAX_DIRTY_ROUNDS = 3  # rooms that keep changing are left to the next run
# What the planner gets for a room whose backend issues ids: never written (apply swaps it).
PENDING_CHAT_ID = "pending-{room_id}"


@dataclass
class RunReport:
    reason: str
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


class Reconciler:
    def __init__(
        self,
        io: MatrixIO,
        stores: Stores,
        rooms: RoomDirectory,
        settings: Callable[[], Settings],
        log: logging.Logger,
        finish_onboarding: FinishOnboarding,
        backends: BackendRegistry,
    ) -> None:
        self.io = io
        self.backends = backends
        self.stores = stores
        self.rooms = rooms
        self.settings = settings
        self.log = log
        self.finish_onboarding = finish_onboarding
        self.last: RunReport | None = None
        self._lock = asyncio.Lock()
        self._periodic: asyncio.Task[None] | None = None
        self._running = False
        self._dirty: set[str] = set()

    async def run(self, reason: str) -> RunReport:
        async with self._lock:
            started = time.monotonic()
            settings = self.settings().reconciliation
            report = RunReport(reason=reason, dry_run=settings.dry_run)
            self._dirty = set()
            self._running = True
            try:
                snapshot = await read_snapshot(self.io, settings.concurrency)
                result = await self._plan_and_apply(snapshot, report)
                # Rooms changed by others while we read them: read again, plan again
                # (docs/reconciliation.md, T13).
                for _ in range(MAX_DIRTY_ROUNDS):
                    dirty, self._dirty = self._dirty, set()
                    if not dirty:
                        break
                    for room_id in sorted(dirty):
                        room = await read_room(self.io, room_id)
                        if room is not None:
                            snapshot = snapshot.with_room(room)
                    report.counts["rooms re-read after live changes"] = len(dirty) + (
                        report.counts.get("rooms re-read after live changes", 0)
                    )
                    result = await self._plan_and_apply(snapshot, report)
            finally:
                self._running = False
            _count(report, result.report)
            if not report.dry_run:
                await self._finish_onboardings(result.report.unfinished_onboardings, report)
            report.seconds = time.monotonic() - started
            self.last = report
            self.log.info("Reconciliation done: %s", report.to_markdown().replace("\n", "; "))
            return report

    async def _plan_and_apply(self, snapshot: Snapshot, report: RunReport) -> Plan:
        # GC frozen for the call: a full GC pass over the fresh snapshot is ~1 s at 50,000 rooms.
        cache = await read_cache(self.stores)
        result = plan_with_gc_frozen(snapshot, cache, self._chat_id_factory(snapshot))
        if report.dry_run:  # platform conversations are created only when applying
            report.counts["writes planned"] = len(result.writes)
            await self.rooms.load_from_cache()
            return result
        issued = await obtain_chat_ids(
            result, lambda room_id, binding: self._create_chat(cache, room_id, binding), self.log
        )
        result = issued.plan
        if issued.created or issued.failed:
            report.counts["platform conversations created"] = len(issued.created) + (
                report.counts.get("platform conversations created", 0)
            )
        if issued.failed:
            report.counts["rooms left without a conversation"] = len(issued.failed)
            report.ignored += issued.failed
        applied = await write_plan(self.io, result)
        report.writes += applied.writes
        report.ignored += [f"write failed: {item}" for item in applied.failed]
        self.rooms.load(await rebuild_cache(self.stores, snapshot, result))
        return result

    async def _finish_onboardings(self, owners: tuple[str, ...], report: RunReport) -> None:
        """Create the first working room a crash kept from owners' Spaces (never fatal here)."""
        finished = 0
        for owner in owners:
            try:
                finished += await self.finish_onboarding(owner)
            except Exception:
                self.log.exception("Could not finish the onboarding of %s", owner)
        if owners:
            report.counts["onboardings finished"] = finished

    def mark_dirty(self, room_id: str) -> None:
        """A room's state changed live; if a run is reading Matrix now, it reads the room again."""
        if self._running:
            self._dirty.add(room_id)

    def _chat_id_factory(self, snapshot: Snapshot) -> NewChatId:
        """Fresh platform_chat_ids named after the room's backend, as `Backend.create_chat` names
        them; a placeholder when the platform issues them (swapped before anything is written)."""
        settings = self.settings()

        def for_room(room_id: str) -> str:
            room = snapshot.rooms.get(room_id)
            event = room.get(layout.BINDING_TYPE) if room else None
            binding = layout.parse_binding(event.content) if event else None
            agent = settings.agent(binding.agent) if binding else None
            if agent is None:
                return new_chat_id("chat")
            if self.backends.for_agent(agent).features.server_state:
                return PENDING_CHAT_ID.format(room_id=room_id)
            return new_chat_id(agent.backend)

        return for_room

    async def _create_chat(self, cache: CacheView, room_id: str, binding: layout.Binding) -> str | None:
        """The platform's id for a room that needs one; None when its backend holds nothing."""
        agent = self.settings().agent(binding.agent)
        if agent is None:
            return None
        backend = self.backends.for_agent(agent)
        if not backend.features.server_state:
            return None
        seed: list[ChatMessage] = []
        row = cache.rooms.get(room_id)
        cached_id = row.binding.platform_chat_id if row and row.binding else None
        if cached_id:  # the room's earlier conversation, as far as the cache holds it
            seed = await stored_seed(self.stores, cached_id, room_id)
        return await backend.create_chat(seed)

    def note_catch_up(self, messages: int, rooms: int, seconds: float) -> None:
        """Catch-up runs after the start-up reconciliation; its result joins that report."""
        self.log.info(
            "Catch-up: %d missed messages to answer in %d rooms (%.2f s)", messages, rooms, seconds
        )
        if self.last is not None:
            self.last.counts["messages caught up"] = messages

    def schedule_periodic(self) -> None:
        """(Re)arm the periodic run from the current config; 0 minutes turns it off."""
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        if self.settings().reconciliation.interval_minutes > 0:
            self._periodic = self.io.spawn(self._every(), name="periodic reconciliation")

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.settings().reconciliation.interval_minutes * 60)
            try:
                await self.run(reason="periodic")
            except Exception:
                self.log.exception("Periodic reconciliation failed; the next one will retry")

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
            "owners invited": len(planned.invited),
            "archived (link removed)": len(planned.archived_by_unlink),
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
            "unfinished onboardings": len(planned.unfinished_onboardings),
            "missing": len(planned.missing),
        }
    )
    report.ignored += [f"{room}: {why}" for room, why in planned.ignored]
