"""Who may use the bot: config mode, admins, and approve/block decisions kept in account data."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from . import layout
from .clock import now_ms
from .config import Settings
from .matrix import MatrixIO, NotFound
from .store.users import UserStore

Reply = Callable[[str], Awaitable[Any]]


class AccessService:
    def __init__(
        self, io: MatrixIO, users: UserStore, settings: Callable[[], Settings], log: logging.Logger
    ) -> None:
        self.io = io
        self.users = users
        self.settings = settings
        self.log = log
        self.decisions = layout.AccessDecisions()
        self._pending: dict[str, str] = {}  # user id → room to tell them when approved

    async def load(self) -> None:
        """Decisions live in the bot's account data (Matrix is the truth); cache them."""
        client = self.io.client
        try:
            content = await self.io.gateway.read(
                "read access decisions", lambda: client.get_account_data(layout.ACCESS)
            )
        except NotFound:
            content = None
        parsed = layout.parse_access(content or {})
        if parsed is None and content:
            self.log.warning("Ignoring malformed %s account data", layout.ACCESS)
        self.decisions = parsed or layout.AccessDecisions()
        for user in await self.users.list_all():
            if user.access_state == "pending" and user.dm_room_id:
                self._pending[user.user_id] = user.dm_room_id

    def has_access(self, user_id: str) -> bool:
        access = self.settings().access
        if access.is_admin(user_id):
            return True
        state = self.decisions.state_of(user_id)
        if state == "blocked":
            return False
        if access.mode == "open" or state == "approved":
            return True
        return access.mode == "allowlist" and access.matches_allowlist(user_id)

    def may_use(self, user_id: str) -> bool:
        """May this user talk to the bot at all (approval mode lets them ask)."""
        if self.has_access(user_id):
            return True
        mode = self.settings().access.mode
        return mode == "approval" and self.decisions.state_of(user_id) != "blocked"

    def pending(self) -> list[str]:
        return sorted(self._pending)

    async def admit(self, user: str, room_id: str, reply: Reply | None = None) -> bool:
        """True when the user may run a command; otherwise one short refusal is sent (through
        `reply`, the command's, when given)."""
        if reply is None:
            reply = partial(self.io.send_notice, room_id)
        if self.has_access(user):
            return True
        if self.decisions.state_of(user) == "blocked":
            await reply("Sorry, you are blocked from using this bot.")
            return False
        if self.settings().access.mode == "approval":
            first_time = user not in self._pending
            self._pending[user] = room_id
            await self.users.set_access(user, "pending")
            await self.users.set_dm_room(user, room_id)
            if first_time:
                self.log.info("Access requested by %s", user)
            await reply(
                "Your request to use this bot is waiting for an admin's approval. "
                "I'll tell you here when you're approved."
            )
            return False
        await reply("Sorry, this bot is not open to you.")
        return False

    async def decide(self, by: str, action: str, target: str, reply: Reply) -> None:
        """Approve, block or unblock `target`; `reply` answers the admin before the user is told."""
        state = {"approve": "approved", "block": "blocked", "unblock": None}[action]
        users = dict(self.decisions.users)
        if state is None:
            users.pop(target, None)
        else:
            users[target] = layout.AccessDecision(state=state, by=by, ts=now_ms())
        decisions = layout.AccessDecisions(users=users)
        content = decisions.to_content()
        client = self.io.client
        await self.io.gateway.write(
            "save the access decision", lambda: client.set_account_data(layout.ACCESS, content)
        )
        self.decisions = decisions
        await self.users.set_access(target, state, by=by if state else None)
        tell_room = self._pending.pop(target, None)
        words = {"approve": "approved", "block": "blocked", "unblock": "unblocked"}[action]
        await reply(f"{target} is now {words}.")
        if action == "approve" and tell_room:
            prefix = self.settings().command_prefix
            await self.io.send_notice(
                tell_room, f"You're approved! Send `!{prefix} start` to create your Space of agents."
            )
