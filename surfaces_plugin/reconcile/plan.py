"""The reconciliation planner: snapshot of Matrix + cache rows → writes, desired cache, report.

The cases it handles, T1–T17, are described in docs/reconciliation.md.

A pure function (no I/O, no awaits), linear in the number of rooms and state events.
Trust rules (docs/layout.md#trust): a room is ours only when the bot created it with our markers (or it
is the verified upgrade of one of ours); only bot-sent `org.surfaces.*`, `m.space.child` and
`m.space.parent` events count; everything else is ignored and reported.

Writes come out in an order that stays safe if applying stops half-way (crash, 429): re-planning
after any prefix converges to the same result. The steps, in order: merge memory into the
winning Space, tombstone losing Spaces, add links, write bindings, parents, remove links, invite.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from operator import attrgetter, itemgetter
from types import MappingProxyType
from typing import Any

from ..layout import (
    BINDING_TYPE,
    LAYOUT_VERSION,
    MEMORY_TYPE,
    NAMESPACE,
    REMOVED,
    SPACE_CHILD_TYPE,
    SPACE_PARENT_TYPE,
    TOMBSTONE_TYPE,
    UNLINKED_KEY,
    Binding,
    Memory,
    RoomKind,
    additional_creators,
    create_predecessor,
    create_room_version,
    creators_have_infinite_power,
    fast_constructor,
    has_our_markers,
    is_live_link,
    order_key,
    parse_binding,
    parse_create_markers,
    parse_memory,
    parse_tombstone,
    space_child_content,
    space_parent_content,
    tombstone_content,
    unlinked_content,
)
from .model import (
    Action,
    CacheView,
    Invite,
    RoomRecord,
    RoomSnapshot,
    SetState,
    Snapshot,
    StateEntry,
    UserRecord,
)

NewChatId = Callable[[str], str]

# State types the bot must be able to send to maintain each kind of room.
_MAINTAINED_TYPES: Mapping[str, tuple[str, ...]] = {
    "space": (SPACE_CHILD_TYPE, TOMBSTONE_TYPE, MEMORY_TYPE),
    "working": (BINDING_TYPE, SPACE_PARENT_TYPE),
}
_MAX_UPGRADE_CHAIN = 64  # a cycle guard; real chains are a handful of rooms
_LOST = "bot is no longer in the room"
_NO_LINKS: Mapping[str, Any] = MappingProxyType({})
_BINDING_KEY = (BINDING_TYPE, "")
_TOMBSTONE_KEY = (TOMBSTONE_TYPE, "")


@dataclass(frozen=True)
class Report:
    spaces: int = 0
    working_rooms: int = 0
    foreign: int = 0  # rooms the bot is in that are not ours (DMs, other rooms): left alone
    ignored: tuple[tuple[str, str], ...] = ()  # (room id, reason): untrusted or malformed input
    adopted: tuple[str, ...] = ()  # our rooms the cache did not know (crash, wiped DB)
    missing: tuple[str, ...] = ()  # cache rows with no room in Matrix any more
    links_added: tuple[tuple[str, str], ...] = ()  # (space, room)
    links_removed: tuple[tuple[str, str], ...] = ()  # (space, room)
    parents_repaired: tuple[str, ...] = ()
    bindings_reverted: tuple[str, ...] = ()  # rewritten from the cache after tampering
    archived_by_unlink: tuple[str, ...] = ()  # the Space link was removed: the room is archived
    backfilled: tuple[str, ...] = ()  # rooms given a platform_chat_id
    duplicates_resolved: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (id, kept, renewed)
    spaces_merged: tuple[tuple[str, str], ...] = ()  # (loser, winner)
    upgrades_followed: tuple[tuple[str, str], ...] = ()  # (old room, new room)
    degraded: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    invited: tuple[tuple[str, str], ...] = ()  # (room, user)
    # Owners whose Space never linked any room and who have no working room: a crash came
    # between creating the Space and the first room (the runner finishes their onboarding).
    unfinished_onboardings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    writes: tuple[Action, ...]
    rooms: Mapping[str, RoomRecord]  # desired cache; rows not here are marked missing
    users: Mapping[str, UserRecord]
    report: Report
    # Rooms whose binding gets an id minted by this plan (room id → that id). Applying asks the
    # room's backend for a real one when the platform holds conversations (`reconcile/chat_ids`).
    fresh_chat_ids: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# power levels


def _level(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():  # old room versions allow "50"
        return int(value)
    return default


def user_level(room: RoomSnapshot, user_id: str) -> float:
    create = room.create
    if create is not None and creators_have_infinite_power(create_room_version(create.content)):
        if user_id == create.sender or user_id in additional_creators(create.content):
            return math.inf
    pl = room.power_levels
    if pl is None:  # spec: without power levels the creator has 100, everyone else 0
        return 100 if create is not None and user_id == create.sender else 0
    users = pl.get("users")
    if isinstance(users, Mapping) and user_id in users:
        return _level(users[user_id], 0)
    return _level(pl.get("users_default"), 0)


def state_level(room: RoomSnapshot, event_type: str) -> int:
    pl = room.power_levels
    if pl is None:
        return 0
    events = pl.get("events")
    if isinstance(events, Mapping) and event_type in events:
        return _level(events[event_type], 50)
    return _level(pl.get("state_default"), 50)


def invite_level(room: RoomSnapshot) -> int:
    pl = room.power_levels
    return 0 if pl is None else _level(pl.get("invite"), 0)


# ---------------------------------------------------------------------------
# working data


@dataclass(slots=True)
class _Link:
    """One m.space.child event as seen in a Space."""

    sender_is_bot: bool
    live: bool  # parses as a child link
    cleared: bool  # bot-sent without `via`: our own removal
    unlinked_because: str | None = None  # why we removed it, when we said so

    @property
    def live_by_bot(self) -> bool:
        return self.sender_is_bot and self.live


@dataclass(slots=True)
class _Room:
    snap: RoomSnapshot
    kind: RoomKind
    owner: str
    joined: bool
    room_id: str = field(init=False)
    degraded: bool = False
    binding: Binding | None = None  # the desired binding (trusted, cached or copied)
    binding_event: Binding | None = None  # what a bot-sent binding event holds now
    adopted_from: str | None = None  # set on an upgrade's new room
    lineage: tuple[_Room, ...] = ()  # the rooms this one replaced, oldest first
    restored: bool = False  # binding rebuilt from the cache after tampering
    replaced_by: str | None = None
    # spaces: child id → link (set by _index_links); other rooms share one empty mapping
    links: Mapping[str, _Link] = field(default_factory=lambda: _NO_LINKS)
    bot_level: float | None = None  # the bot's power level here, once computed

    def __post_init__(self) -> None:
        self.room_id = self.snap.room_id  # a plain attribute: read on every hot path

    @property
    def writable(self) -> bool:
        return self.joined and not self.degraded

    @property
    def ts(self) -> int:
        return self.snap.create.origin_server_ts if self.snap.create else 0

    @property
    def conversation_ts(self) -> int:
        """When the conversation began: an upgraded room is as old as its first room."""
        return self.lineage[0].ts if self.lineage else self.ts

    @property
    def conversation_rooms(self) -> tuple[str, ...]:
        return (*(r.room_id for r in self.lineage), self.room_id)


@dataclass
class _Out:
    """Mutable accumulators; frozen into Plan/Report at the end."""

    memory: list[SetState] = field(default_factory=list)
    tombstones: list[SetState] = field(default_factory=list)
    bindings: list[SetState] = field(default_factory=list)
    parents: list[SetState] = field(default_factory=list)
    link_adds: list[SetState] = field(default_factory=list)
    link_removals: list[SetState] = field(default_factory=list)
    invites: list[Invite] = field(default_factory=list)
    report: defaultdict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def note(self, key: str, item: Any) -> None:
        self.report[key].append(item)

    def writes(self) -> tuple[Action, ...]:
        return (
            *self.memory,
            *self.tombstones,
            *self.link_adds,  # before bindings: a moved room's new link must not look cleared
            *self.bindings,
            *self.parents,
            *self.link_removals,
            *self.invites,
        )


# ---------------------------------------------------------------------------
# the planner


def plan(snapshot: Snapshot, cache: CacheView, new_chat_id: NewChatId) -> Plan:
    """Compute what to write and what the cache should hold. Pure; deterministic for a given
    `new_chat_id` (called with the room id whenever a room needs a fresh platform_chat_id)."""
    return _Planner(snapshot, cache, new_chat_id).run()


class _Planner:
    def __init__(self, snapshot: Snapshot, cache: CacheView, new_chat_id: NewChatId) -> None:
        self.s = snapshot
        self.bot = snapshot.bot_id
        self.cache = cache
        self.new_chat_id = new_chat_id
        self.fresh_chat_ids: dict[str, str] = {}
        self.out = _Out()
        self.rooms: dict[str, _Room] = {}
        self.foreign: set[str] = set()
        self.canonical: dict[str, str] = {}  # owner → canonical Space
        self.tombstones_checked: set[str] = set()
        self.invited: set[str] = set()  # rooms whose owner this plan invites
        self.parent = space_parent_content(snapshot.server_name)  # compared with, never written

    def run(self) -> Plan:
        rooms, classify = self.s.rooms, self._classify
        for room_id in sorted(rooms):
            classify(rooms[room_id])
        self._follow_upgrades()
        self._report_foreign_claims()
        for room in self.rooms.values():
            room.degraded = room.joined and self._lacks_power(room)
        self._index_links()
        self._choose_spaces()
        working = self._active_working()
        self._settle_bindings(working)
        self._resolve_chat_ids(working)
        for room in working:
            self._write_binding(room)
            self._repair_parent(room)
            self._repair_link(room)
            self._invite_owner(room)
        for room in self._spaces():
            self._remove_stale_links(room)
            self._invite_owner(room)
        return self._result()

    # -- classification -------------------------------------------------------

    def _ignore(self, room_id: str, reason: str) -> None:
        self.out.note("ignored", (room_id, reason))

    def _classify(self, snap: RoomSnapshot) -> None:
        create = snap.create
        if create is None:
            self._ignore(snap.room_id, "no m.room.create event in the snapshot")
            return
        if create.sender != self.bot:
            if has_our_markers(create.content):
                self._ignore(snap.room_id, f"markers set by {create.sender}, not the bot")
            self.foreign.add(snap.room_id)
            return
        markers = parse_create_markers(create.content)
        if markers is None:
            if has_our_markers(create.content):
                self._ignore(snap.room_id, "malformed markers in m.room.create")
            self.foreign.add(snap.room_id)
            return
        if markers.v > LAYOUT_VERSION:
            self._ignore(snap.room_id, f"layout v{markers.v} is newer than this plugin")
            return
        room = _Room(snap, markers.kind, markers.owner, joined=snap.bot_membership == "join")
        if room.kind == "working":
            self._load_binding(room)
            if room.binding is None:
                return
        self.rooms[snap.room_id] = room

    def _report_foreign_claims(self) -> None:
        """`org.surfaces.*` state in a room that is not ours (e.g. a user's fake binding)."""
        prefix = NAMESPACE + "."
        for room_id in sorted(self.foreign):
            claims = sorted(
                (event_type, key, event.sender)
                for (event_type, key), event in self.s.rooms[room_id].state.items()
                if event_type.startswith(prefix)
            )
            for event_type, _, sender in claims:
                self._ignore(room_id, f"{event_type} by {sender} in a room that is not ours")

    def _load_binding(self, room: _Room) -> None:
        """The bot-sent binding, else the cached copy (a revert), else the room is ignored."""
        event = room.snap.state.get(_BINDING_KEY)
        problem = None
        if event is None:
            problem = "no binding"
        elif event.sender != self.bot:
            problem = f"binding sent by {event.sender}, not the bot"
        else:
            parsed = parse_binding(event.content)
            if parsed is None:
                problem = "malformed binding"
            elif parsed.owner != room.owner:
                problem = "binding owner differs from the creation marker"
            else:
                room.binding = room.binding_event = parsed
                return
        cached = self._cached_binding(room)
        if cached is None:
            self._ignore(room.room_id, f"{problem}, and no cached copy to restore")
            return
        self._ignore(room.room_id, f"{problem}: restored from the cache")
        room.binding = cached
        room.restored = True

    def _cached_binding(self, room: _Room) -> Binding | None:
        row = self.cache.rooms.get(room.room_id)
        if row is None or row.kind != "working" or row.owner != room.owner:
            return None
        return row.binding

    # -- upgrades -------------------------------------------------------------

    def _valid_successor(self, room: _Room) -> str | None:
        """The replacement room when the tombstone is authorised and verifiably points back."""
        event = room.snap.state.get(_TOMBSTONE_KEY)
        if event is None or room.room_id in self.tombstones_checked:
            return None
        self.tombstones_checked.add(room.room_id)
        target = parse_tombstone(event.content)
        problem = None
        if target is None or target == room.room_id:
            problem = "malformed tombstone"
        elif user_level(room.snap, event.sender) < state_level(room.snap, TOMBSTONE_TYPE):
            problem = f"tombstone by {event.sender}, who lacks the power"
        else:
            new = self.s.rooms.get(target)
            if new is None or new.bot_membership != "join":
                problem = f"tombstone points to {target}, which the bot has not joined"
            elif new.create is None or create_predecessor(new.create.content) != room.room_id:
                problem = f"tombstone points to {target}, whose predecessor is not this room"
        if problem is not None:
            self._ignore(room.room_id, problem)
            return None
        return target

    def _follow_upgrades(self) -> None:
        """Working rooms with a valid tombstone hand their binding to the new room."""
        for room_id in sorted(self.rooms):
            room = self.rooms[room_id]
            if _TOMBSTONE_KEY not in room.snap.state:  # the common case: nothing to follow
                continue
            for _ in range(_MAX_UPGRADE_CHAIN):
                if room.kind != "working" or room.replaced_by is not None:
                    break
                target = self._valid_successor(room)
                if target is None:
                    break
                new = self.rooms.get(target) or self._adopt_successor(room, target)
                if new is None or new.kind != "working" or new.owner != room.owner:
                    self._ignore(room_id, f"tombstone points to {target}, which is not ours")
                    break
                room.replaced_by = target
                self.out.note("upgrades_followed", (room.room_id, target))
                room = new

    def _adopt_successor(self, old: _Room, target: str) -> _Room | None:
        snap = self.s.rooms[target]
        if target not in self.foreign:
            return None  # ignored for a reason of its own: don't overrule it
        self.foreign.discard(target)
        new = _Room(snap, "working", old.owner, joined=True, adopted_from=old.room_id)
        new.lineage = (*old.lineage, old)
        new.binding = old.binding
        event = snap.get(BINDING_TYPE)
        if event is not None and event.sender == self.bot:
            parsed = parse_binding(event.content)
            if parsed is not None and parsed.owner == old.owner:
                new.binding = new.binding_event = parsed  # written on an earlier run: it wins
        self.rooms[target] = new
        return new

    # -- power ----------------------------------------------------------------

    def _bot_level(self, room: _Room) -> float:
        level = room.bot_level
        if level is None:
            level = room.bot_level = user_level(room.snap, self.bot)
        return level

    def _lacks_power(self, room: _Room) -> bool:
        have = self._bot_level(room)
        if have == math.inf:  # the creator on room v12+: the common case, decided at once
            return False
        return any(have < state_level(room.snap, t) for t in _MAINTAINED_TYPES[room.kind])

    # -- spaces ---------------------------------------------------------------

    def _spaces(self) -> list[_Room]:
        return [r for r in self.rooms.values() if r.kind == "space"]

    def _index_links(self) -> None:
        for space in self._spaces():
            space.links = {
                child_id: self._read_link(space, child_id, event)
                for child_id, event in space.snap.of_type(SPACE_CHILD_TYPE).items()
            }

    def _read_link(self, space: _Room, child_id: str, event: StateEntry) -> _Link:
        by_bot = event.sender == self.bot
        content = event.content
        live = is_live_link(content)
        cleared = by_bot and not live and isinstance(content, Mapping) and "via" not in content
        because = content.get(UNLINKED_KEY) if cleared else None
        if not by_bot and live:
            self._ignore(space.room_id, f"child link to {child_id} sent by {event.sender}")
        elif by_bot and not live and not cleared:
            self._ignore(space.room_id, f"malformed child link to {child_id}")
        return _Link(
            sender_is_bot=by_bot,
            live=live,
            cleared=cleared,
            unlinked_because=because if isinstance(because, str) else None,
        )

    def _valid_children(self, space: _Room) -> int:
        """Links that survive this plan; our writes only ever raise the winner's count."""
        count = 0
        for child_id, link in space.links.items():
            child = self.rooms.get(child_id)
            if not link.live_by_bot or child is None or child.kind != "working":
                continue
            archived = child.binding is not None and child.binding.archived
            count += (
                child.owner == space.owner
                and child.replaced_by is None
                and child.joined
                and not archived
            )
        return count

    def _retired(self, space: _Room) -> str | None:
        """A Space tombstoned by someone with the power to (in practice: our own merge)."""
        event = space.snap.get(TOMBSTONE_TYPE)
        if event is None:
            return None
        target = parse_tombstone(event.content)
        if (
            target is None
            or target == space.room_id
            or user_level(space.snap, event.sender) < state_level(space.snap, TOMBSTONE_TYPE)
        ):
            self._ignore(space.room_id, f"tombstone by {event.sender} ignored")
            return None
        return target

    def _choose_spaces(self) -> None:
        """Per owner, one canonical Space; the others are merged into it and tombstoned.

        Ranking: bot not degraded, then most valid children, then the owner has joined,
        then the oldest creation, then the lowest room id.
        """
        candidates: dict[str, list[_Room]] = {}
        for space in self._spaces():
            retired = self._retired(space)
            if retired is not None:
                space.replaced_by = retired
            elif space.joined:
                candidates.setdefault(space.owner, []).append(space)
        for owner, spaces in candidates.items():
            spaces.sort(
                key=lambda s: (
                    s.degraded,
                    -self._valid_children(s),
                    s.snap.membership(owner) != "join",
                    s.ts,
                    s.room_id,
                )
            )
            self.canonical[owner] = spaces[0].room_id
            if len(spaces) > 1:
                self._merge(spaces[0], spaces[1:])

    def _merge(self, winner: _Room, losers: list[_Room]) -> None:
        """Memory first (a crash before the tombstone just merges again), then the tombstones."""
        body = "This Space was merged into another one."
        merging = []
        for loser in losers:
            self.out.note("spaces_merged", (loser.room_id, winner.room_id))
            if not loser.writable:
                self._ignore(loser.room_id, "duplicate Space the bot cannot tombstone")
                continue
            merging.append(loser)
            loser.replaced_by = winner.room_id
            content = tombstone_content(winner.room_id, body)
            self.out.tombstones.append(
                SetState(loser.room_id, TOMBSTONE_TYPE, "", content, "duplicate Space")
            )
        self._merge_memory(winner, merging)

    def _merge_memory(self, winner: _Room, losers: list[_Room]) -> None:
        ours = self._memory(winner)
        notes = list(ours.notes)
        for loser in losers:
            notes.extend(n for n in self._memory(loser).notes if n not in notes)
        if len(notes) == len(ours.notes) or not winner.writable:
            return
        merged = replace(ours, notes=tuple(notes)).to_content()
        self.out.memory.append(
            SetState(winner.room_id, MEMORY_TYPE, "", merged, "merge memory of duplicate Spaces")
        )

    def _memory(self, space: _Room) -> Memory:
        event = space.snap.get(MEMORY_TYPE)
        if event is None or event.sender != self.bot:
            return Memory()
        return parse_memory(event.content) or Memory()

    # -- working rooms --------------------------------------------------------

    def _active_working(self) -> list[_Room]:
        return [
            r
            for r in self.rooms.values()
            if r.kind == "working" and r.replaced_by is None and r.binding is not None
        ]

    def _target_space(self, room: _Room) -> str:
        """The canonical Space, when we can link rooms there; otherwise rooms stay put."""
        assert room.binding is not None
        canonical = self.rooms.get(self.canonical.get(room.owner, ""))
        return canonical.room_id if canonical and canonical.writable else room.binding.space_id

    def _settle_bindings(self, rooms: list[_Room]) -> None:
        """Point bindings at the canonical Space; a link we removed ourselves means archived."""
        for room in rooms:
            assert room.binding is not None
            target = self._target_space(room)
            binding = room.binding
            if binding.space_id != target:
                binding = replace(binding, space_id=target)
            space = self.rooms.get(target)
            link = space.links.get(room.room_id) if space else None
            unlinked = (
                link is not None
                and link.cleared
                and link.unlinked_because is None  # plain `{}`: removed by archive or by hand
                and room.binding.space_id == target == self.canonical.get(room.owner)
                and room.adopted_from is None
                and room.joined
            )
            if unlinked and not binding.archived:
                binding = replace(binding, archived=True)
                self.out.note("archived_by_unlink", room.room_id)
            room.binding = binding

    def _resolve_chat_ids(self, rooms: list[_Room]) -> None:
        """One platform_chat_id per conversation: backfill missing ones, split duplicates."""
        holders: dict[str, list[_Room]] = {}
        for room in rooms:
            pcid = room.binding.platform_chat_id if room.binding else None
            if pcid is not None:
                holders.setdefault(pcid, []).append(room)
        for pcid in sorted(holders):
            group = holders[pcid]
            if len(group) > 1:
                self._split_duplicate(pcid, group)
        taken = {r.binding.platform_chat_id for r in rooms if r.binding}
        for room in sorted(rooms, key=_room_id):
            assert room.binding is not None
            if room.binding.platform_chat_id is not None or not room.writable:
                continue
            cached = self._cached_chat_id(room)
            pcid = cached if cached and cached not in taken else self._fresh_chat_id(room)
            taken.add(pcid)
            room.binding = replace(room.binding, platform_chat_id=pcid)
            self.out.note("backfilled", room.room_id)

    def _fresh_chat_id(self, room: _Room) -> str:
        pcid = self.fresh_chat_ids[room.room_id] = self.new_chat_id(room.room_id)
        return pcid

    def _cached_chat_id(self, room: _Room) -> str | None:
        """The id the DB knows for this conversation (newest room of an upgrade chain first)."""
        for room_id in reversed(room.conversation_rooms):
            row = self.cache.rooms.get(room_id)
            if row is not None and row.binding is not None and row.binding.platform_chat_id:
                return row.binding.platform_chat_id
        return None

    def _split_duplicate(self, pcid: str, group: list[_Room]) -> None:
        """Keeper: a room we can't rewrite, then the cache's holder, then the oldest conversation
        (an upgraded room counts from its first room), then the lowest room id."""

        def cached_here(room: _Room) -> bool:
            rows = (self.cache.rooms.get(rid) for rid in room.conversation_rooms)
            return any(
                row is not None and row.binding is not None and row.binding.platform_chat_id == pcid
                for row in rows
            )

        def rank(room: _Room) -> tuple[bool, bool, int, str]:
            return (room.writable, not cached_here(room), room.conversation_ts, room.room_id)

        group.sort(key=rank)
        renewed = []
        for room in group[1:]:
            if not room.writable:
                self._ignore(room.room_id, f"shares platform_chat_id {pcid}; cannot rewrite")
                continue
            assert room.binding is not None
            room.binding = replace(room.binding, platform_chat_id=self._fresh_chat_id(room))
            renewed.append(room.room_id)
        self.out.note("duplicates_resolved", (pcid, group[0].room_id, tuple(renewed)))

    def _write_binding(self, room: _Room) -> None:
        binding = room.binding
        if binding is None or binding is room.binding_event or not room.writable:
            return
        if binding == room.binding_event:
            return
        reason = "follow upgrade" if room.adopted_from else "repair binding"
        if room.restored:
            self.out.note("bindings_reverted", room.room_id)
            reason = "restore binding from the cache"
        self.out.bindings.append(
            SetState(room.room_id, BINDING_TYPE, "", room.binding.to_content(), reason)
        )

    def _repair_parent(self, room: _Room) -> None:
        if not room.writable:
            return
        target = self._target_space(room)
        repaired = False
        others = [
            (key, event)
            for (event_type, key), event in room.snap.state.items()
            if event_type == SPACE_PARENT_TYPE and key != target
        ]
        others.sort(key=_first)
        for key, event in others:
            live = is_live_link(event.content)
            if live and event.sender != self.bot:
                self._ignore(room.room_id, f"parent link to {key} sent by {event.sender}")
            elif live:
                self.out.parents.append(
                    SetState(room.room_id, SPACE_PARENT_TYPE, key, REMOVED, "stale parent")
                )
                repaired = True
        current = room.snap.get(SPACE_PARENT_TYPE, target)
        if (
            current is None
            or current.sender != self.bot
            or _as_dict(current.content) != self.parent
        ):
            desired = space_parent_content(self.s.server_name)  # each write gets its own dict
            self.out.parents.append(
                SetState(room.room_id, SPACE_PARENT_TYPE, target, desired, "parent link")
            )
            repaired = True
        if repaired:
            self.out.note("parents_repaired", room.room_id)

    def _repair_link(self, room: _Room) -> None:
        """The room's own link in its canonical Space: present unless archived."""
        assert room.binding is not None
        space = self.rooms.get(self.canonical.get(room.owner, ""))
        if space is None or not space.writable or not room.joined:
            return
        link = space.links.get(room.room_id)
        if room.binding.archived:
            if link is not None and link.live and not link.sender_is_bot:  # ours: stale links
                self._unlink(space, room.room_id, "archived room")
            return
        if link is not None and link.live_by_bot:
            return
        content = space_child_content(self.s.server_name, order_key(room.ts))
        self.out.link_adds.append(
            SetState(space.room_id, SPACE_CHILD_TYPE, room.room_id, content, "child link")
        )
        self.out.note("links_added", (space.room_id, room.room_id))

    def _unlink(self, space: _Room, child_id: str, reason: str, because: str | None = None) -> None:
        content = unlinked_content(because) if because else REMOVED
        self.out.link_removals.append(
            SetState(space.room_id, SPACE_CHILD_TYPE, child_id, content, reason)
        )
        self.out.note("links_removed", (space.room_id, child_id))

    def _remove_stale_links(self, space: _Room) -> None:
        """Bot-sent links that point nowhere useful go; links to rooms we can't read stay."""
        if not space.writable:
            return
        for child_id in sorted(space.links):
            link = space.links[child_id]
            malformed = link.sender_is_bot and not link.live and not link.cleared
            if not (link.live_by_bot or malformed) or child_id in self.s.unreadable:
                continue
            reason = self._stale_reason(space, child_id)
            if reason is not None:
                lost = reason == _LOST
                self._unlink(space, child_id, reason, because="lost" if lost else None)

    def _stale_reason(self, space: _Room, child_id: str) -> str | None:
        child = self.rooms.get(child_id)
        if child is None:
            if child_id not in self.s.rooms and child_id in self.cache.rooms:
                return _LOST  # ours, but the bot can't see it any more (e.g. kicked, not re-read)
            ours_but_unbound = child_id in self.s.rooms and child_id not in self.foreign
            return None if ours_but_unbound else "not one of our rooms"
        if child.kind != "working":
            return "a Space is never a child"
        if child.owner != space.owner:
            return "belongs to another user"
        if child.replaced_by is not None:
            return "room was upgraded"
        if not child.joined:
            return _LOST
        canonical = self.canonical.get(space.owner)
        if canonical is not None and canonical != space.room_id:
            return "moved to the canonical Space"
        if child.binding is not None and child.binding.archived:
            return "archived room"
        return None

    def _invite_owner(self, room: _Room) -> None:
        """Finish an interrupted onboarding: invite an owner who never had a membership here."""
        if not room.writable or room.replaced_by is not None:
            return
        if room.kind == "working" and (room.binding is None or room.binding.archived):
            return
        if room.kind == "space" and self.canonical.get(room.owner) != room.room_id:
            return
        if room.snap.membership(room.owner) is not None:
            return
        access = self.s.access.state_of(room.owner) if self.s.access else None
        if access == "blocked":
            return
        have = self._bot_level(room)
        if have != math.inf and have < invite_level(room.snap):
            return
        self.out.invites.append(Invite(room.room_id, room.owner, "owner was never invited"))
        self.invited.add(room.room_id)
        self.out.note("invited", (room.room_id, room.owner))

    # -- results --------------------------------------------------------------

    def _record(self, room: _Room) -> RoomRecord:
        return _new_record(
            room_id=room.room_id,
            kind=room.kind,
            owner=room.owner,
            binding=room.binding,
            bot_membership="join" if room.joined else "lost",
            owner_membership=self._membership(room, room.owner),
            replaced_by=room.replaced_by,
            degraded=room.degraded,
        )

    def _membership(self, room: _Room, user_id: str) -> str | None:
        """As it will be once our invites land, so the cache matches the next run's."""
        if room.room_id in self.invited and user_id == room.owner:
            return "invite"
        return room.snap.membership(user_id)

    def _users(self) -> dict[str, UserRecord]:
        owners = {r.owner for r in self.rooms.values()}
        decided = set(self.s.access.users) if self.s.access else set()
        users = {}
        for user_id in sorted(owners | decided):
            space_id = self.canonical.get(user_id)
            space = self.rooms.get(space_id) if space_id else None
            users[user_id] = UserRecord(
                user_id=user_id,
                space_id=space_id,
                access=self.s.access.state_of(user_id) if self.s.access else None,
                space_membership=self._membership(space, user_id) if space else None,
            )
        return users

    def _note_unfinished_onboardings(self) -> None:
        with_rooms = {r.owner for r in self.rooms.values() if r.kind == "working"}
        for owner, space_id in sorted(self.canonical.items()):
            space = self.rooms.get(space_id)
            if owner in with_rooms or space is None or not space.writable or space.links:
                continue
            self.out.note("unfinished_onboardings", owner)

    def _result(self) -> Plan:
        self._note_unfinished_onboardings()
        rooms = {rid: self._record(self.rooms[rid]) for rid in sorted(self.rooms)}
        for room in self.rooms.values():
            if room.degraded:
                self.out.note("degraded", room.room_id)
            if not room.joined:
                self.out.note("lost", room.room_id)
            if room.room_id not in self.cache.rooms and room.replaced_by is None:
                self.out.note("adopted", room.room_id)  # (a replaced room's row goes missing)
        missing = sorted(set(self.cache.rooms) - set(rooms))
        r = self.out.report
        kinds = Counter(x.kind for x in rooms.values())
        report = Report(
            spaces=kinds["space"],
            working_rooms=kinds["working"],
            foreign=len(self.foreign),
            missing=tuple(missing),
            **{k: tuple(sorted(v) if k in _SORTED_KEYS else v) for k, v in r.items()},
        )
        return Plan(
            writes=self.out.writes(),
            rooms=rooms,
            users=self._users(),
            report=report,
            fresh_chat_ids=self.fresh_chat_ids,
        )


_SORTED_KEYS = frozenset({"adopted", "degraded", "lost"})
_new_record = fast_constructor(RoomRecord)


_first = itemgetter(0)
_room_id = attrgetter("room_id")


def _as_dict(content: Mapping[str, Any]) -> Mapping[str, Any]:
    return content if type(content) is dict else dict(content)
