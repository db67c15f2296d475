"""The running Surfaces service: builds and wires the services, and routes incoming events.

This is the one place that knows every service; each service receives only what it uses.
Events that arrive before start-up work is done (reconciliation) wait behind the ready gate
and are routed afterwards in arrival order, so nothing is lost or answered twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from mautrix.client import Client, SyncStream
from mautrix.types import (
    EncryptedEvent,
    Event,
    Membership,
    MessageEvent,
    MessageType,
    ReactionEvent,
    RedactionEvent,
    RoomID,
    StateEvent,
)
from mautrix.util.async_db import Database

from .access import AccessService
from .backends import BackendRegistry
from .catchup import CatchUp
from .clock import now_ms, utc_text
from .commands import CommandTree, split_command
from .config import Settings
from .context_builder import ContextBuilder
from .dispatch import Dispatcher
from .e2ee import E2EE
from .handlers import Request, Services, register_commands
from .history import History
from .layout import parse_attachment
from .matrix import Gateway, GatewayError, MatrixIO
from .media import MediaService
from .memory import MemoryService
from .onboarding import Onboarding
from .reactions import Reactions
from .reconcile.runner import Reconciler
from .rooms import RoomDirectory
from .store import Stores
from .timeline import has_text
from .toolbox import ToolBox
from .usage import UsageLedger
from .voice import Voice

_ROUTED_MSGTYPES = (MessageType.TEXT, MessageType.EMOTE)
# What the ready gate holds, in arrival order.
Incoming = MessageEvent | RedactionEvent | ReactionEvent


class ReadyGate:
    """Holds events until start-up is done, then lets them through in arrival order."""

    def __init__(self) -> None:
        self._open = False
        self._held: list[Incoming] = []

    @property
    def is_open(self) -> bool:
        return self._open

    def hold(self, events: list[Incoming]) -> None:
        self._held += events

    def close(self) -> None:
        self._open = False

    def open(self) -> list[Incoming]:
        """Open the gate; returns what waited, oldest first."""
        self._open = True
        held, self._held = self._held, []
        return held


class RecentIds:
    """The last `size` event ids seen, so an event delivered twice is handled once."""

    def __init__(self, size: int = 2048) -> None:
        self._order: deque[str] = deque(maxlen=size)
        self._ids: set[str] = set()

    def add(self, event_id: str) -> bool:
        """False when `event_id` was already seen."""
        if event_id in self._ids:
            return False
        if len(self._order) == self._order.maxlen:
            self._ids.discard(self._order[0])
        self._order.append(event_id)
        self._ids.add(event_id)
        return True


class Surfaces:
    def __init__(
        self, *, client: Client, database: Database, settings: Settings, log: logging.Logger
    ) -> None:
        self.settings = settings
        self.log = log
        gateway = Gateway(
            concurrency=max(8, settings.reconciliation.concurrency), log=log.getChild("matrix")
        )
        self.io = io = MatrixIO(client, gateway, log)
        self.stores = stores = Stores(database)
        current = self.current_settings
        self.backends = backends = BackendRegistry(settings, log=log.getChild("backends"))
        self.tools = tools = ToolBox(current, log.getChild("tools"))
        self.rooms = rooms = RoomDirectory(io, stores.rooms, log)
        self.access = access = AccessService(io, stores.users, current, log)
        self.memory = memory = MemoryService(io, stores.memory, stores.users, current, log)
        self.history = history = History(io, stores, rooms, backends, current, log)
        self.usage = usage = UsageLedger(io, stores.usage, current, log.getChild("usage"))
        self.media = media = MediaService(io, current, log.getChild("media"))
        context = ContextBuilder(
            io, history, memory.notes, backends, current, usage, media=media
        )
        onboarding = Onboarding(io, stores, rooms, history, backends, access, current, log)
        self.reconciler = reconciler = Reconciler(
            io, stores, rooms, current, log, finish_onboarding=onboarding.finish, backends=backends
        )
        self.e2ee = e2ee = E2EE(io, current, log.getChild("e2ee"))
        self.catch_up = catch_up = CatchUp(
            io, rooms, history, stores.processed, e2ee, current, log,
            replay_commands=self.replay_commands,
        )
        self.dispatcher = Dispatcher(
            io, rooms, history, context, access, backends, catch_up, current, log,
            on_caught_up=reconciler.note_catch_up, usage=usage, tools=tools, media=media,
            voice=Voice(io, media, e2ee, backends, current, log.getChild("voice")),
        )
        self.reactions = Reactions(rooms, self.dispatcher, log)
        self.onboarding = onboarding
        commands = CommandTree(log.getChild("commands"))
        register_commands(commands)
        self.services = Services(
            io=io,
            e2ee=e2ee,
            rooms=rooms,
            history=history,
            context=context,
            memory=memory,
            onboarding=onboarding,
            access=access,
            dispatcher=self.dispatcher,
            backends=backends,
            tools=tools,
            reconciler=reconciler,
            usage=usage,
            commands=commands,
            status=self.status_text,
        )
        self.gate = ReadyGate()
        # A command sent before this moment arrived while the bot was down, however maubot
        # delivers it (a dropped first sync, a later one, or catch-up): it is answered as late.
        self.started_ms = now_ms()
        self._invites_seen: set[str] = set()
        self._routed = RecentIds()

    def current_settings(self) -> Settings:
        """Services read settings through this, so a live config change reaches them all."""
        return self.settings

    @property
    def bot_id(self) -> str:
        return self.io.bot_id

    # lifecycle

    async def start(self, early_events: list[Incoming]) -> None:
        self.gate.hold(early_events)
        await self.access.load()
        if self.settings.reconciliation.on_start:
            await self.reconciler.run(reason="start")
        else:
            await self.rooms.load_from_cache()
        if await self.usage.needs_rebuild():  # the database was lost (or is new): read the rooms
            self.io.spawn(self.usage.rebuild(self.rooms.all_rooms()), name="usage rebuild")
        # Missed messages first (oldest first); those also seen live are deduplicated by event id.
        self.dispatcher.start_catch_up([r for r in self.rooms.all_rooms() if not r.archived])
        self.io.spawn(self._catch_up_dms(), name="catch-up of DMs")
        self.open_gate()
        self.reconciler.schedule_periodic()

    def open_gate(self) -> None:
        """Route what waited behind the gate, in arrival order, and everything after it."""
        for evt in self.gate.open():
            self._route(evt)

    async def stop(self) -> None:
        self.reconciler.stop()
        await self.dispatcher.stop()
        await self.io.cancel_tasks()
        await self.backends.close()
        await self.tools.close()

    def apply_settings(self, settings: Settings) -> None:
        changed = settings.describe_changes(self.settings)
        self.settings = settings
        self.backends.apply(settings)
        self.tools.apply(settings)
        self.reconciler.schedule_periodic()
        self.log.info("Config updated live; changed: %s", ", ".join(changed) or "nothing")

    async def status_text(self) -> str:
        users = await self.stores.users.list_all()
        rooms = self.rooms.all_rooms()
        lines = [
            "**Surfaces status**",
            "",
            f"- users: {len(users)} ({sum(1 for u in users if u.space_id)} with a Space)",
            f"- working rooms: {sum(1 for r in rooms if not r.archived)} routed, "
            f"{sum(1 for r in rooms if r.archived)} archived",
            "- backends: "
            + ", ".join(f"`{b.id}` ({b.type})" for b in self.backends.specs()),
            f"- access: {self.settings.access.mode}",
            await self.usage.status_line(),
            *await self.e2ee.status_lines(),
        ]
        pending = self.access.pending()
        if pending:
            lines.append("- waiting for approval: " + ", ".join(pending))
        last = self.reconciler.last
        lines += ["", last.to_markdown() if last else "No reconciliation has run yet."]
        return "\n".join(lines)

    # incoming

    async def on_message(self, evt: MessageEvent) -> None:
        # Runs synchronously up to the queueing, so events keep the order they were synced in.
        if evt.sender == self.bot_id or not (
            self._is_new_text(evt) or self._is_media(evt) or self._is_text_edit(evt)
        ):
            return
        if not self._routed.add(evt.event_id):
            return  # decrypted twice: by maubot and after a late key (`on_encrypted`)
        if not self.gate.is_open:
            self.gate.hold([evt])
            return
        self._route(evt)

    @staticmethod
    def _is_new_text(evt: MessageEvent) -> bool:
        """A text message with text in it, not an edit of one (an edit is never a new turn).

        mautrix passes a body of any JSON type through (and makes null ""): checked here, once
        for commands and the dispatcher alike.
        """
        content = evt.content
        return (
            content.msgtype in _ROUTED_MSGTYPES
            and has_text(content.body)
            and content.get_edit() is None
        )

    @staticmethod
    def _is_media(evt: MessageEvent) -> bool:
        """An image, file or voice message naming its media (never a command)."""
        return parse_attachment(evt.content.serialize()) is not None

    @staticmethod
    def _is_text_edit(evt: MessageEvent) -> bool:
        """An edit whose new content is a text with text in it (mautrix gives the new content)."""
        content = evt.content
        return (
            content.msgtype in _ROUTED_MSGTYPES
            and has_text(content.body)
            and content.get_edit() is not None
        )

    def _route(self, evt: Incoming) -> None:
        if isinstance(evt, RedactionEvent):
            self.dispatcher.redact(evt.room_id, evt.redacts)
            return
        if isinstance(evt, ReactionEvent):
            self.reactions.on_reaction(evt)
            return
        if self._is_media(evt):
            self.dispatcher.submit(evt)
            return
        parsed = split_command(evt.content.body, self.settings.command_prefix)
        if evt.content.get_edit() is not None:
            if parsed is None:  # an edit into a command runs nothing
                self.dispatcher.edit(evt)
            return
        if parsed is not None:
            sub, args = parsed
            self.io.spawn(self._run_command(evt, sub, args), name=f"command {sub}")
            return
        self.dispatcher.submit(evt)

    async def on_encrypted(self, evt: EncryptedEvent) -> None:
        """An encrypted message: maubot decrypts it when the bot has its key; when not, wait for
        the key or ask the sender's devices for it, else tell the room once per session."""
        if evt.sender == self.bot_id or not self.io.can_encrypt or await self.e2ee.has_key(evt):
            return
        # In the background: the key can only arrive through a later sync, which waits for handlers.
        self.io.spawn(self._without_key(evt), name="undecryptable message")

    async def _without_key(self, evt: EncryptedEvent) -> None:
        raw = evt.serialize()
        plain = await self.e2ee.recover(evt.room_id, raw)
        if plain is not None:
            decrypted = Event.deserialize(plain)
            if isinstance(decrypted, MessageEvent):
                await self.on_message(decrypted)
            return
        if self.rooms.room(evt.room_id) is not None or await self._is_dm(evt.room_id):
            await self.e2ee.tell_undecryptable(evt.room_id, [raw])

    async def _is_dm(self, room_id: str) -> bool:
        store = self.io.client.state_store
        members = await store.get_members(RoomID(room_id)) if store is not None else []
        return len(members) == 2

    async def on_redaction(self, evt: RedactionEvent) -> None:
        # Held like messages while starting, so it is routed after the message it redacts.
        if not evt.redacts:
            return
        if not self.gate.is_open:
            self.gate.hold([evt])
            return
        self._route(evt)

    async def on_reaction(self, evt: ReactionEvent) -> None:
        # Held like messages while starting, so it is routed after the answer it reacts to.
        if evt.sender == self.bot_id or not self._routed.add(evt.event_id):
            return
        if not self.gate.is_open:
            self.gate.hold([evt])
            return
        self._route(evt)

    async def _run_command(self, evt: MessageEvent, sub: str, args: str) -> None:
        """Live or caught up alike: a command sent before this start is answered as late."""
        late_sent = utc_text(evt.timestamp) if evt.timestamp < self.started_ms else None
        request = Request(evt, self.services, self.settings, late_sent=late_sent)
        admit = self.access.admit
        if sub not in ("help", "") and not await admit(evt.sender, evt.room_id, request.reply):
            return
        await self.services.commands.run(request, sub, args)

    async def replay_commands(self, room_id: str, events: Sequence[dict[str, Any]]) -> None:
        """Commands that arrived while the bot was down (catch-up), oldest first: each gets what
        it would have live (refusals included), or is told it was not run (`CommandSpec.replay`).
        One sent during this start (read back before maubot delivered it) is run as live."""
        for raw in events:
            try:
                evt = MessageEvent.deserialize({**raw, "room_id": room_id})
            except Exception as e:  # read back from any server: never trusted to parse
                self.log.warning("Skipped a caught-up command in %s: %s", room_id, e)
                continue
            parsed = split_command(str(evt.content.body), self.settings.command_prefix)
            if parsed is None or not self._routed.add(evt.event_id):
                continue  # also delivered live: answered there
            try:
                await self._run_command(evt, *parsed)
            except GatewayError as e:  # unanswered: the next start's catch-up tries again
                self.log.warning("Could not answer the caught-up command %s: %s", evt.event_id, e)

    async def _catch_up_dms(self) -> None:
        """Commands sent while the bot was down in its DMs (working rooms are caught up by the
        dispatcher); the DMs are the ones the users invited the bot to, from the cache."""
        # Users without a Space are "missing" to reconciliation, but their DM is still known.
        users = await self.stores.users.list_all(include_missing=True)
        dms = {u.dm_room_id for u in users if u.dm_room_id and self.rooms.room(u.dm_room_id) is None}
        slots = asyncio.Semaphore(self.settings.reconciliation.concurrency)

        async def one(room_id: str) -> int:
            async with slots:
                return await self.catch_up.commands_in(room_id)

        counts = await asyncio.gather(*(one(room_id) for room_id in sorted(dms)))
        if any(counts):
            self.log.info("Caught up %d commands in %d DMs", sum(counts), len(dms))

    def on_layout_state(self, evt: StateEvent) -> None:
        """Someone else changed a room's state: a reconciliation reading it now reads it again."""
        if evt.sender != self.bot_id:
            self.reconciler.mark_dirty(evt.room_id)

    async def on_member(self, evt: StateEvent) -> None:
        self.on_layout_state(evt)
        if evt.state_key != self.bot_id or evt.sender == self.bot_id:
            return
        if evt.content.membership in (Membership.LEAVE, Membership.BAN):
            await self.rooms.lose(evt.room_id)  # kicked or banned: stop routing at once
            return
        # The invite also reappears in the room's timeline after joining, with the event id the
        # invite section lacked: handle only the invite section's copy (and each event once).
        source = getattr(evt, "source", None)
        if source is not None and not source & SyncStream.INVITED_ROOM:
            return
        if evt.content.membership != Membership.INVITE:
            return
        if evt.event_id:  # stripped invite state has no event id: every such invite is new
            if evt.event_id in self._invites_seen:
                return
            self._invites_seen.add(evt.event_id)
        await self.onboarding.on_invite(evt)
