"""Runs reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache).

Until the inventory and apply steps land, a run rebuilds the routing map from the cache.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..app import Surfaces

REPORT_KEY = "reconciliation.last_report"


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

    async def run(self, reason: str) -> RunReport:
        async with self._lock:
            started = time.monotonic()
            report = RunReport(reason=reason, started_ms=int(time.time() * 1000))
            await self.app.chats.load_from_cache()
            report.counts["working rooms"] = len(self.app.chats.all_rooms())
            report.seconds = time.monotonic() - started
            self.last = report
            await self.app.stores.kv.set_json(REPORT_KEY, report.to_json())
            self.app.log.info("Reconciliation done: %s", report.to_markdown().replace("\n", "; "))
            return report

    def schedule_periodic(self) -> None:
        minutes = self.app.settings.reconciliation.interval_minutes
        if minutes > 0 and self._periodic is None:
            self._periodic = self.app.spawn(self._every(minutes), name="periodic reconciliation")

    async def _every(self, minutes: float) -> None:
        while True:
            await asyncio.sleep(minutes * 60)
            await self.run(reason="periodic")

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
