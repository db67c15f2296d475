"""Who may use the bot: config mode, admins, and approve/block decisions kept in account data."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mautrix.types import RoomID

from . import layout
from .matrix import NotFound

if TYPE_CHECKING:
    from .app import Surfaces
    from .context import Request


class AccessService:
    def __init__(self, app: Surfaces) -> None:
        self.app = app
        self.decisions = layout.AccessDecisions()
        self._pending: dict[str, str] = {}  # user id → room to tell them when approved

    async def load(self) -> None:
        """Decisions live in the bot's account data (Matrix is the truth); cache them."""
        try:
            content = await self.app.gateway.read(
                "read access decisions",
                lambda: self.app.client.get_account_data(layout.ACCESS),
            )
        except NotFound:
            content = None
        parsed = layout.parse_access(content or {})
        if parsed is None and content:
            self.app.log.warning("Ignoring malformed %s account data", layout.ACCESS)
        self.decisions = parsed or layout.AccessDecisions()
        for user in await self.app.stores.users.list_all():
            if user.access_state == "pending" and user.dm_room_id:
                self._pending[user.user_id] = user.dm_room_id

    def has_access(self, user_id: str) -> bool:
        access = self.app.settings.access
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
        return self.app.settings.access.mode == "approval" and self.decisions.state_of(user_id) != "blocked"

    def pending(self) -> list[str]:
        return sorted(self._pending)

    async def admit(self, req: Request) -> bool:
        """True when the sender may run a command; otherwise one short refusal is sent."""
        user = req.sender
        if self.has_access(user):
            return True
        if self.decisions.state_of(user) == "blocked":
            await req.reply("Sorry, you are blocked from using this bot.")
            return False
        if self.app.settings.access.mode == "approval":
            first_time = user not in self._pending
            self._pending[user] = req.room_id
            await self.app.stores.users.set_access(user, "pending")
            await self.app.stores.users.set_dm_room(user, req.room_id)
            if first_time:
                self.app.log.info("Access requested by %s", user)
            await req.reply(
                "Your request to use this bot is waiting for an admin's approval. "
                "I'll tell you here when you're approved."
            )
            return False
        await req.reply("Sorry, this bot is not open to you.")
        return False

    async def decide(self, req: Request, action: str, target: str) -> None:
        state = {"approve": "approved", "block": "blocked", "unblock": None}[action]
        users = dict(self.decisions.users)
        if state is None:
            users.pop(target, None)
        else:
            users[target] = layout.AccessDecision(state=state, by=req.sender, ts=int(time.time() * 1000))
        decisions = layout.AccessDecisions(users=users)
        content = decisions.to_content()
        await self.app.gateway.write(
            "save the access decision",
            lambda: self.app.client.set_account_data(layout.ACCESS, content),
        )
        self.decisions = decisions
        await self.app.stores.users.set_access(target, state, by=req.sender if state else None)
        tell_room = self._pending.pop(target, None)
        words = {"approve": "approved", "block": "blocked", "unblock": "unblocked"}[action]
        await req.reply(f"{target} is now {words}.")
        if action == "approve" and tell_room:
            prefix = self.app.settings.command_prefix
            await self.app.send_notice(
                RoomID(tell_room),
                f"You're approved! Send `!{prefix} start` to create your Space of agents.",
            )
