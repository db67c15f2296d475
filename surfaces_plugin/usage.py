"""The usage ledger: tokens per user, agent and day (UTC), the daily quotas, `!ai usage`.

Figures are what the backends report (`Usage`), estimated where they report none and marked
so. Each entry has a key the timeline shows too (`answer_entry`: the message answered and the
command that asked again; a summary notice's event id), so rebuilding the ledger from the room
timelines after the database was lost adds every entry once, whatever was recorded live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import layout
from .backends import ChatMessage, ToolCall, Usage
from .clock import now_ms
from .config import Settings
from .context_window import message_tokens
from .matrix import GatewayError, MatrixIO
from .rooms import WorkingRoom
from .store.usage import UsageEntry, UsageStore, UsageSum
from .timeline import Event, edit_target, event_ts, read_back
from .tokens import estimate_tokens

DAY_MS = 86_400_000
WINDOW_DAYS = 7  # what `!ai usage` shows, and how far back a rebuild reads
REBUILD_MAX_PAGES = 10  # per room: up to 1000 events back when rebuilding the ledger
ESTIMATED = "≈"  # marks a figure that is partly estimated


def utc_day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


def day_start_ms(ms: int) -> int:
    return ms - ms % DAY_MS


def window_start_ms(ms: int) -> int:
    """00:00 UTC of the first day `!ai usage` shows (today and the 6 days before it)."""
    return day_start_ms(ms) - (WINDOW_DAYS - 1) * DAY_MS


def duration_text(ms: int) -> str:
    """`5 h 12 min`, `12 min`, `under a minute`."""
    minutes = ms // 60_000
    if minutes < 1:
        return "under a minute"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


class Tally:
    """What one answer (or summary) cost, over every request it made (a tool loop makes one per
    round). A count the backend did not report is estimated, and the whole marked estimated."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self.estimated = False
        self.requests = 0

    def add(
        self,
        reported: Usage | None,
        messages: Sequence[ChatMessage],
        said: str,
        calls: Iterable[ToolCall] = (),
    ) -> None:
        self.requests += 1
        prompt = reported.prompt_tokens if reported is not None else None
        completion = reported.completion_tokens if reported is not None else None
        if prompt is None:
            prompt = sum(message_tokens(m) for m in messages)
            self.estimated = True
        if completion is None:
            completion = estimate_tokens(said) + sum(
                estimate_tokens(c.name) + estimate_tokens(str(c.arguments)) for c in calls
            )
            self.estimated = True
        self.prompt += prompt
        self.completion += completion

    @property
    def usage(self) -> layout.TokenUsage | None:
        """None while no request was made."""
        if not self.requests:
            return None
        return layout.TokenUsage(self.prompt, self.completion, self.estimated)


@dataclass(frozen=True)
class OverQuota:
    """A message refused for a quota: what to say, and whether the room hears it the first time
    today (a room is told once per day)."""

    text: str
    first_today: bool


@dataclass
class Figure:
    prompt: int = 0
    completion: int = 0
    estimated: int = 0  # of prompt + completion

    def add(self, s: UsageSum) -> None:
        self.prompt += s.prompt_tokens
        self.completion += s.completion_tokens
        self.estimated += s.estimated_tokens

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def short(self) -> str:
        return f"{ESTIMATED if self.estimated else ''}{self.total:,}"

    def long(self) -> str:
        return f"{self.short()} tokens ({self.prompt:,} prompt + {self.completion:,} completion)"


def _figure(sums: Iterable[UsageSum]) -> Figure:
    figure = Figure()
    for s in sums:
        figure.add(s)
    return figure


class UsageLedger:
    def __init__(
        self,
        io: MatrixIO,
        store: UsageStore,
        settings: Callable[[], Settings],
        log: logging.Logger,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.io = io
        self.store = store
        self.settings = settings
        self.log = log
        self.clock = clock  # ms; tests pass their own to cross midnight without waiting

    # recording

    async def record_answer(
        self, user_id: str, turn: layout.TurnMarker, message_id: str | None
    ) -> None:
        """Count an answer (its marker's `usage`); `message_id`: its last message."""
        key = answer_entry(turn.answers, turn.command, message_id)
        await self.record(user_id, turn.agent, turn.usage, key)

    async def record(
        self, user_id: str, agent: str, usage: layout.TokenUsage | None, entry_id: str | None
    ) -> None:
        """Count what an answer or summary cost (`entry_id`: the event carrying its usage)."""
        if usage is None or not entry_id:
            return
        now = self.clock()
        await self.store.add(
            UsageEntry(
                entry_id, user_id, agent, utc_day(now), usage.prompt, usage.completion,
                usage.estimated, now,
            )
        )

    # rebuilt from the timelines after the database was lost

    async def needs_rebuild(self) -> bool:
        return not await self.store.is_open()

    async def rebuild(self, rooms: Sequence[WorkingRoom]) -> int:
        """Read each room back to the start of the window and count the usage its markers show;
        the ledger is then open (not rebuilt again). Returns the entries added."""
        since = window_start_ms(self.clock())
        slots = asyncio.Semaphore(self.settings().reconciliation.concurrency)
        complete = True

        async def one(room: WorkingRoom) -> int:
            nonlocal complete
            async with slots:
                try:
                    events = await read_back(
                        self.io,
                        room.room_id,
                        stop=lambda chunk: any(event_ts(e) < since for e in chunk),
                        max_pages=REBUILD_MAX_PAGES,
                    )
                except GatewayError as e:  # the next start tries again
                    self.log.warning("Could not read %s to rebuild usage: %s", room.room_id, e)
                    complete = False
                    return 0
            return await self.restore(room.owner, events, since)

        added = sum(await asyncio.gather(*(one(room) for room in rooms)))
        if complete:
            now = self.clock()
            await self.store.mark_open(utc_day(now), now)
        self.log.info("Usage ledger rebuilt from %d rooms: %d entries", len(rooms), added)
        return added

    async def restore(self, owner: str, events: Iterable[Event], since_ms: int = 0) -> int:
        """Count the usage the bot's markers in `events` show (from `since_ms` on) for `owner`."""
        added = 0
        bot = self.io.bot_id
        for event in events:
            if event.get("sender") != bot or event_ts(event) < since_ms:
                continue
            found = usage_in(event)
            if found is None:
                continue
            entry_id, agent, usage = found
            ts = event_ts(event)
            added += await self.store.add(
                UsageEntry(
                    entry_id, owner, agent, utc_day(ts), usage.prompt, usage.completion,
                    usage.estimated, ts,
                )
            )
        return added

    # quotas

    async def over_quota(self, room: WorkingRoom, user_id: str) -> OverQuota | None:
        """None when `user_id` may still send messages to the room's agent today."""
        settings = self.settings()
        if settings.access.is_admin(user_id):
            return None  # exempt (README: Usage and quotas); still counted
        agent = settings.agent_or_default(room.agent)
        overall, per_agent = settings.limits.daily_tokens_per_user, agent.daily_tokens_per_user
        if not overall and not per_agent:
            return None
        now = self.clock()
        today = utc_day(now)
        sums = await self.store.sums(today, user_id)
        used = _figure(sums).total
        used_with_agent = _figure(s for s in sums if s.agent == agent.id).total
        if overall and used >= overall:
            what = f"your daily quota of {overall:,} tokens ({used:,} used today)"
        elif per_agent and used_with_agent >= per_agent:
            what = (
                f"your daily quota of {per_agent:,} tokens with `{agent.id}` "
                f"({used_with_agent:,} used today)"
            )
        else:
            return None
        reset = day_start_ms(now) + DAY_MS
        text = (
            f"You have used {what}, so I am not sending your messages to `{agent.id}` until "
            f"it resets at 00:00 UTC, in {duration_text(reset - now)}. Send them again then. "
            "(I say this once per room and day.)"
        )
        return OverQuota(text, await self.store.first_notice(room.room_id, today))

    # what `!ai usage` and `!ai status` show

    async def report(self, user_id: str) -> str:
        now = self.clock()
        today = utc_day(now)
        sums = await self.store.sums(utc_day(window_start_ms(now)), user_id)
        if not sums:
            return "You have used no tokens in the last 7 days (UTC)."
        lines = [
            "**Your token usage** (days in UTC)",
            "",
            f"- today ({today}): {_figure(s for s in sums if s.day == today).long()}",
            f"- last 7 days: {_figure(sums).long()}",
            *self._quota_lines(user_id, sums, today, now),
            "- per agent, last 7 days:",
        ]
        for agent, agent_sums in _by(sums, lambda s: s.agent).items():
            today_part = _figure(s for s in agent_sums if s.day == today)
            lines.append(
                f"  - `{agent}`: {_figure(agent_sums).long()}; today {today_part.short()}"
            )
        if any(s.estimated_tokens for s in sums):
            lines += ["", f"{ESTIMATED} marks figures that are partly estimated: the backend "
                      "reported no usage for some answers."]
        return "\n".join(lines)

    def _quota_lines(
        self, user_id: str, sums: list[UsageSum], today: str, now: int
    ) -> list[str]:
        settings = self.settings()
        overall = settings.limits.daily_tokens_per_user
        per_agent = {a.id: a.daily_tokens_per_user for a in settings.agents.values()}
        if settings.access.is_admin(user_id) or not (overall or any(per_agent.values())):
            return []
        todays = [s for s in sums if s.day == today]
        resets = f"resets at 00:00 UTC, in {duration_text(day_start_ms(now) + DAY_MS - now)}"
        lines = []
        if overall:
            left = max(0, overall - _figure(todays).total)
            lines.append(f"- daily quota: {overall:,} tokens, {left:,} left today ({resets})")
        for agent, quota in per_agent.items():
            if quota:
                used = _figure(s for s in todays if s.agent == agent).total
                lines.append(
                    f"- daily quota with `{agent}`: {quota:,} tokens, "
                    f"{max(0, quota - used):,} left today"
                )
        return lines

    async def report_all(self) -> str:
        now = self.clock()
        today = utc_day(now)
        sums = await self.store.sums(utc_day(window_start_ms(now)))
        if not sums:
            return "Nobody has used any tokens in the last 7 days (UTC)."
        lines = [
            "**Token usage of everyone** (days in UTC)",
            "",
            f"- today ({today}): {_figure(s for s in sums if s.day == today).long()}",
            f"- last 7 days: {_figure(sums).long()}",
            "",
        ]
        for user, user_sums in _by(sums, lambda s: s.user_id).items():
            agents = ", ".join(
                f"`{agent}` {_figure(part).short()}"
                for agent, part in _by(user_sums, lambda s: s.agent).items()
            )
            today_part = _figure(s for s in user_sums if s.day == today)
            lines.append(
                f"- {user}: today {today_part.short()}, 7 days {_figure(user_sums).short()} "
                f"({agents})"
            )
        if any(s.estimated_tokens for s in sums):
            lines += ["", f"{ESTIMATED} marks figures that are partly estimated."]
        return "\n".join(lines)

    async def status_line(self) -> str:
        today = utc_day(self.clock())
        sums = await self.store.sums(today)
        users = len({s.user_id for s in sums})
        return f"- tokens today (UTC): {_figure(sums).long()}, {users} users"


def usage_in(event: Event) -> tuple[str, str, layout.TokenUsage] | None:
    """(entry id, agent, usage) when a bot event carries usage in its turn or summary marker;
    the entry id is the message the usage belongs to (the edited one, for an edit)."""
    content = event.get("content")
    edit = edit_target(event)
    message_id = edit[0] if edit is not None else event.get("event_id")
    if not isinstance(message_id, str) or not message_id:
        return None
    turn = layout.parse_turn_marker(content)
    if turn is not None and turn.usage is not None:
        entry = answer_entry(turn.answers, layout.parse_command_marker(content), message_id)
        return (entry, turn.agent, turn.usage) if entry else None
    summary = layout.parse_summary_marker(content)
    if summary is None or summary.usage is None or summary.agent is None:
        return None
    return message_id, summary.agent, summary.usage


def answer_entry(answers: str | None, command: str | None, message_id: str | None) -> str | None:
    """An answer's ledger key: the message it answers and the `!ai` command that asked again (a
    retry), so usage repeated on every message of a split answer counts once."""
    if answers:
        return f"answer {answers} {command or ''}".rstrip()
    return message_id


def _by(sums: Iterable[UsageSum], key: Callable[[UsageSum], str]) -> dict[str, list[UsageSum]]:
    groups: dict[str, list[UsageSum]] = defaultdict(list)
    for s in sums:
        groups[key(s)].append(s)
    return dict(groups)
