"""The running Surfaces service: owns the services and routes incoming events.

Events that arrive before start-up work is done (reconciliation) wait in `_pending` and are
routed afterwards in arrival order, so nothing is lost or answered twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mautrix.client import Client, SyncStream
from mautrix.types import (
    EventID,
    EventType,
    Membership,
    MessageEvent,
    MessageType,
    RoomID,
    StateEvent,
)
from mautrix.util.async_db import Database

from . import replies
from .access import AccessService
from .agents import BackendRegistry
from .chats import ChatManager
from .commands import CommandTree, split_command
from .config import Settings
from .context import Request
from .dispatch import Dispatcher
from .handlers import register_commands
from .matrix import Gateway
from .memory import MemoryService
from .onboarding import Onboarding
from .reconcile.runner import Reconciler
from .store import Stores

_ROUTED_MSGTYPES = (MessageType.TEXT, MessageType.EMOTE)


class Surfaces:
    def __init__(
        self, *, client: Client, database: Database, settings: Settings, log: logging.Logger
    ) -> None:
        self.client = client
        self.settings = settings
        self.log = log
        self.gateway = Gateway(
            concurrency=max(8, settings.reconciliation.concurrency), log=log.getChild("matrix")
        )
        self.stores = Stores(database)
        self.backends = BackendRegistry(settings, log=log.getChild("backends"))
        self.access = AccessService(self)
        self.chats = ChatManager(self)
        self.memory = MemoryService(self)
        self.onboarding = Onboarding(self)
        self.dispatcher = Dispatcher(self)
        self.reconciler = Reconciler(self)
        self.commands = CommandTree(log.getChild("commands"))
        register_commands(self.commands)
        self.ready = asyncio.Event()
        self._pending: list[MessageEvent] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._invites_seen: set[str] = set()

    @property
    def bot_id(self) -> str:
        return self.client.mxid

    # lifecycle

    async def start(self, early_events: list[MessageEvent]) -> None:
        self._pending[:0] = early_events
        await self.access.load()
        if self.settings.reconciliation.on_start:
            await self.reconciler.run(reason="start")
        else:
            await self.chats.load_from_cache()
        # Missed messages first (oldest first); those also seen live are deduplicated by event id.
        self.dispatcher.start_catch_up([r for r in self.chats.all_rooms() if not r.archived])
        self.ready.set()
        pending, self._pending = self._pending, []
        for evt in pending:
            self._route(evt)
        self.reconciler.schedule_periodic()

    async def stop(self) -> None:
        self.reconciler.stop()
        await self.dispatcher.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backends.close()

    def apply_settings(self, settings: Settings) -> None:
        changed = settings.describe_changes(self.settings)
        self.settings = settings
        self.backends.apply(settings)
        self.reconciler.schedule_periodic()
        self.log.info("Config updated live; changed: %s", ", ".join(changed) or "nothing")

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A background task that stop() cancels and whose failure is logged."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("Task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def status_text(self) -> str:
        users = await self.stores.users.list_all()
        rooms = self.chats.all_rooms()
        lines = [
            "**Surfaces status**",
            "",
            f"- users: {len(users)} ({sum(1 for u in users if u.space_id)} with a Space)",
            f"- working rooms: {sum(1 for r in rooms if not r.archived)} routed, "
            f"{sum(1 for r in rooms if r.archived)} archived",
            "- backends: "
            + ", ".join(f"`{b.id}` ({b.type})" for b in self.backends.specs()),
            f"- access: {self.settings.access.mode}",
        ]
        pending = self.access.pending()
        if pending:
            lines.append("- waiting for approval: " + ", ".join(pending))
        last = self.reconciler.last
        lines += ["", last.to_markdown() if last else "No reconciliation has run yet."]
        return "\n".join(lines)

    # sending

    async def send_notice(
        self, room_id: RoomID, text: str, extra: dict[str, Any] | None = None
    ) -> EventID:
        return await self.send_content(room_id, replies.notice(text, extra))

    async def send_content(self, room_id: RoomID, content: dict[str, Any]) -> EventID:
        return await self.gateway.write(
            "send a message",
            lambda: self.client.send_message_event(room_id, EventType.ROOM_MESSAGE, content),
        )

    # incoming

    async def on_message(self, evt: MessageEvent) -> None:
        # Runs synchronously up to the queueing, so events keep the order they were synced in.
        if evt.sender == self.bot_id or not self._is_new_text(evt):
            return
        if not self.ready.is_set():
            self._pending.append(evt)
            return
        self._route(evt)

    @staticmethod
    def _is_new_text(evt: MessageEvent) -> bool:
        content = evt.content
        if content.msgtype not in _ROUTED_MSGTYPES:
            return False
        relates = getattr(content, "relates_to", None)
        return not (relates and relates.rel_type and str(relates.rel_type) == "m.replace")

    def _route(self, evt: MessageEvent) -> None:
        body = evt.content.body or ""
        parsed = split_command(body, self.settings.command_prefix)
        if parsed is not None:
            sub, args = parsed
            self.spawn(self._run_command(evt, sub, args), name=f"command {sub}")
            return
        self.dispatcher.submit(evt)

    async def _run_command(self, evt: MessageEvent, sub: str, args: str) -> None:
        request = Request(self, evt)
        if sub not in ("help", "") and not await self.access.admit(request):
            return
        await self.commands.run(request, sub, args)

    def on_layout_state(self, evt: StateEvent) -> None:
        """Someone else changed a room's state: a reconciliation reading it now reads it again."""
        if evt.sender != self.bot_id:
            self.reconciler.mark_dirty(evt.room_id)

    async def on_member(self, evt: StateEvent) -> None:
        self.on_layout_state(evt)
        if evt.state_key != self.bot_id or evt.sender == self.bot_id:
            return
        if evt.content.membership in (Membership.LEAVE, Membership.BAN):
            await self.chats.lose(evt.room_id)  # kicked or banned: stop routing at once
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
