"""Personal Spaces and working rooms: `!ai start`, `!ai new`, `!ai archive` and the DM flow.

Creation is idempotent and crash-safe: one lock per user, and a journal row written before
each createRoom so that reconciliation can tell a crash mid-way from a finished onboarding.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

from mautrix.types import EventType, RoomID, StateEvent, UserID

from . import layout
from .chats import WorkingRoom, now_ms
from .commands import Refusal
from .matrix import GatewayError, PermissionDenied
from .store.rooms import Room as RoomRow

if TYPE_CHECKING:
    from .app import Surfaces


class Onboarding:
    def __init__(self, app: Surfaces) -> None:
        self.app = app
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._room_version: str | None = None

    @property
    def server_name(self) -> str:
        return self.app.bot_id.split(":", 1)[1]

    def link(self, room_id: str) -> str:
        """A matrix.to link; v12 room ids carry no server, so name ours as `via`."""
        return layout.matrix_to(room_id, via=(self.server_name,))

    async def room_version(self) -> str:
        """The homeserver's default room version (decides how power levels are written)."""
        if self._room_version is None:
            caps = await self.app.gateway.read(
                "read the homeserver's capabilities",
                lambda: self.app.client.api.request("GET", "/_matrix/client/v3/capabilities"),
            )
            versions = caps.get("capabilities", {}).get("m.room_versions", {})
            self._room_version = str(versions.get("default") or "10")
        return self._room_version

    # !ai start

    async def start(self, user_id: str) -> str:
        """Create the user's Space and first room, or re-invite them; returns the reply."""
        settings = self.app.settings
        prefix = settings.command_prefix
        async with self._locks[user_id]:
            space_id = await self.space_of(user_id)
            if space_id is not None and self._has_rooms(user_id):
                await self._reinvite(user_id, space_id)
                return (
                    f"Your Space already exists: [open it]({self.link(space_id)}). "
                    f"I re-sent the invites you might have missed. `!{prefix} new` adds a room."
                )
            if space_id is None:
                space_id = await self._create_space(user_id)
            else:  # a crash came between the Space and its first room: finish onboarding
                await self._reinvite(user_id, space_id)
            room = await self._create_working_room(
                user_id, space_id, settings.default_agent, settings.spaces.first_room_title
            )
        return (
            f"Your Space is ready: [open it]({self.link(space_id)}). I invited you to it and "
            f"to your first working room, [{room.title}]({self.link(room.room_id)}), where "
            f"you talk to `{room.agent}`. Accept the invites, then just write in the room."
        )

    def _has_rooms(self, user_id: str) -> bool:
        """Any working room, archived ones included: onboarding got past its first room."""
        return any(room.owner == user_id for room in self.app.chats.all_rooms())

    async def space_of(self, user_id: str) -> str | None:
        user = await self.app.stores.users.get(user_id)
        return user.space_id if user is not None and user.space_id else None

    async def _create_space(self, owner: str) -> str:
        name = self.app.settings.spaces.name_template.format(
            displayname=await self._displayname(owner), localpart=owner[1:].split(":", 1)[0]
        )
        request = layout.space_create_request(
            owner=owner,
            name=name,
            bot_id=self.app.bot_id,
            server_name=self.server_name,
            room_version=await self.room_version(),
        )
        await self.app.stores.journal.begin(owner, "space")
        space_id = await self.app.gateway.write(
            "create your Space", lambda: self.app.client.create_room(**request)
        )
        await self.app.stores.journal.complete(owner, "space", space_id)
        await self.app.stores.users.set_space(owner, space_id)
        await self.app.stores.rooms.upsert(RoomRow(room_id=space_id, kind="space", owner=owner))
        await self._invite(owner, space_id)
        return space_id

    async def _displayname(self, user_id: str) -> str:
        try:
            profile = await self.app.gateway.read(
                "read the user's profile", lambda: self.app.client.get_displayname(UserID(user_id))
            )
        except GatewayError:
            profile = None
        return profile or user_id[1:].split(":", 1)[0]

    # !ai new

    async def new_room(self, user_id: str, agent_id: str, title: str) -> str:
        prefix = self.app.settings.command_prefix
        async with self._locks[user_id]:
            space_id = await self.space_of(user_id)
            if space_id is None:
                raise Refusal(f"You have no Space yet. Send `!{prefix} start` first.")
            room = await self._create_working_room(user_id, space_id, agent_id, title)
        return (
            f"New working room [{room.title}]({self.link(room.room_id)}) with "
            f"`{room.agent}`. I invited you to it."
        )

    async def _create_working_room(
        self, owner: str, space_id: str, agent_id: str, title: str
    ) -> WorkingRoom:
        app = self.app
        agent = app.settings.agent(agent_id)
        assert agent is not None
        title = title or f"Chat with {agent.name}"
        chat_id = await app.backends.for_agent(agent).create_chat()
        # Creation time orders the Space, as reconciliation orders the rooms it re-links.
        order = layout.order_key(now_ms())
        room = WorkingRoom(
            room_id="",
            owner=owner,
            space_id=space_id,
            agent=agent.id,
            title=title,
            platform_chat_id=chat_id,
            order_key=order,
            last_activity_ms=now_ms(),
        )
        request = layout.working_room_create_request(
            owner=owner,
            space_id=space_id,
            binding=room.binding(),
            bot_id=app.bot_id,
            server_name=self.server_name,
            room_version=await self.room_version(),
        )
        await app.stores.journal.begin(owner, "room")
        room_id = await app.gateway.write(
            "create a working room", lambda: app.client.create_room(**request)
        )
        await app.stores.journal.complete(owner, "room", room_id)
        room = WorkingRoom(**{**room.__dict__, "room_id": room_id})
        await self._link(space_id, room_id, order)
        await app.chats.remember(room)
        await app.chats.start_chat(room)
        await self._invite(owner, room_id)
        return room

    async def _link(self, space_id: str, room_id: str, order: str) -> None:
        content = layout.space_child_content(self.server_name, order)
        await self.app.gateway.write(
            "link the room into your Space",
            lambda: self.app.client.send_state_event(
                RoomID(space_id), EventType.SPACE_CHILD, content, state_key=room_id
            ),
        )

    # !ai archive

    async def archive(self, room: WorkingRoom) -> None:
        app = self.app
        await app.gateway.write(
            "unlink the room from your Space",
            lambda: app.client.send_state_event(
                RoomID(room.space_id), EventType.SPACE_CHILD, {}, state_key=room.room_id
            ),
        )
        await app.chats.update_binding(room, archived=True)

    # invites

    async def _invite(self, user_id: str, room_id: str) -> None:
        try:
            await self.app.gateway.write(
                "invite you",
                lambda: self.app.client.invite_user(RoomID(room_id), UserID(user_id)),
            )
        except PermissionDenied as e:
            # Already joined or invited: nothing to do.
            self.app.log.debug("Invite of %s to %s skipped: %s", user_id, room_id, e.reason)

    async def _reinvite(self, user_id: str, space_id: str) -> None:
        """Invite the owner again to their Space and rooms wherever they are not a member."""
        for room_id in [space_id] + [r.room_id for r in await self.app.chats.rooms_of(user_id)]:
            try:
                members = await self.app.gateway.read(
                    "read the room's members",
                    lambda rid=room_id: self.app.client.get_joined_members(RoomID(rid)),
                )
            except GatewayError:
                continue
            if user_id not in members:
                await self._invite(user_id, room_id)

    async def on_invite(self, evt: StateEvent) -> None:
        """The bot was invited: join and greet allowed users, decline the others politely."""
        app = self.app
        inviter = evt.sender
        prefix = app.settings.command_prefix
        if not app.access.may_use(inviter):
            await app.gateway.write(
                "decline the invite",
                lambda: app.client.leave_room(
                    evt.room_id, reason="Sorry, this Surfaces bot is not open to you."
                ),
            )
            return
        if not app.settings.onboarding.on_invite:
            return
        try:
            await app.gateway.write("join the room", lambda: app.client.join_room(evt.room_id))
        except GatewayError as e:
            app.log.warning("Could not join %s after an invite from %s: %s", evt.room_id, inviter, e)
            return
        await app.stores.users.set_dm_room(inviter, evt.room_id)
        if app.settings.onboarding.auto_start and app.access.has_access(inviter):
            await app.send_notice(evt.room_id, await self.start(inviter))
            return
        await app.send_notice(
            evt.room_id,
            f"Hi! I'm Surfaces: I give you a Space of AI agent conversations. Send "
            f"`!{prefix} start` to create yours, or `!{prefix} help` for everything I can do.",
        )

