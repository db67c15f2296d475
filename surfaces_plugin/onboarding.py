"""Personal Spaces and working rooms: `!ai start`, `!ai new`, `!ai archive` and the DM flow.

Creation is idempotent and crash-safe: one lock per user; each room is created with its
markers, parent link and binding atomically, so whatever a crash leaves behind, reconciliation
recognises from Matrix alone and finishes (docs/reconciliation.md, T2 and T3).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from mautrix.types import EventType, RoomID, StateEvent, UserID

from . import layout
from .access import AccessService
from .backends import BackendError, BackendRegistry
from .clock import now_ms
from .config import Settings, encrypt_new_rooms
from .errors import Refusal
from .history import History, not_created
from .matrix import GatewayError, MatrixIO, PermissionDenied
from .names import clean_name
from .rooms import RoomDirectory, WorkingRoom
from .store import Stores
from .store.rooms import Room as RoomRow


class Onboarding:
    def __init__(
        self,
        io: MatrixIO,
        stores: Stores,
        rooms: RoomDirectory,
        history: History,
        backends: BackendRegistry,
        access: AccessService,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.io = io
        self.users = stores.users
        self.room_cache = stores.rooms
        self.rooms = rooms
        self.history = history
        self.backends = backends
        self.access = access
        self.settings = settings
        self.log = log
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._room_version: str | None = None

    async def room_version(self) -> str:
        """The homeserver's default room version (decides how power levels are written)."""
        if self._room_version is None:
            client = self.io.client
            caps = await self.io.gateway.read(
                "read the homeserver's capabilities",
                lambda: client.api.request("GET", "/_matrix/client/v3/capabilities"),
            )
            versions = caps.get("capabilities", {}).get("m.room_versions", {})
            self._room_version = str(versions.get("default") or "10")
        return self._room_version

    # !ai start

    async def start(self, user_id: str) -> str:
        """Create the user's Space and first room, or re-invite them; returns the reply."""
        settings = self.settings()
        prefix = settings.command_prefix
        link = self.io.link
        async with self._locks[user_id]:
            space_id = await self.space_of(user_id)
            # Any working room, archived ones included: onboarding got past its first room.
            if space_id is not None and self.rooms.has_any(user_id):
                await self._reinvite(user_id, space_id)
                return (
                    f"Your Space already exists: [open it]({link(space_id)}). "
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
            f"Your Space is ready: [open it]({link(space_id)}). I invited you to it and "
            f"to your first working room, [{room.title}]({link(room.room_id)}), where "
            f"you talk to `{room.agent}`. Accept the invites, then just write in the room."
        )

    async def finish(self, user_id: str) -> bool:
        """Finish an onboarding a crash cut between the Space and the first room (reconciliation
        found the Space empty): create the room and tell the user where they asked, if known."""
        if not self.access.has_access(user_id) or self.rooms.has_any(user_id):
            return False
        reply = await self.start(user_id)
        user = await self.users.get(user_id)
        if user is not None and user.dm_room_id:
            await self.io.send_notice(user.dm_room_id, reply)
        self.log.info("Finished the onboarding of %s after a restart", user_id)
        return True

    async def space_of(self, user_id: str) -> str | None:
        user = await self.users.get(user_id)
        return user.space_id if user is not None and user.space_id else None

    async def _create_space(self, owner: str) -> str:
        name = self.settings().spaces.name_template.format(
            displayname=await self._displayname(owner), localpart=owner[1:].split(":", 1)[0]
        )
        request = layout.space_create_request(
            owner=owner,
            name=name,
            bot_id=self.io.bot_id,
            server_name=self.io.server_name,
            room_version=await self.room_version(),
        )
        client = self.io.client
        space_id = await self.io.gateway.write(
            "create your Space", lambda: client.create_room(**request)
        )
        await self.users.set_space(owner, space_id)
        await self.room_cache.upsert(RoomRow(room_id=space_id, kind="space", owner=owner))
        await self._invite(owner, space_id)
        return space_id

    async def _displayname(self, user_id: str) -> str:
        try:
            client = self.io.client
            profile = await self.io.gateway.read(
                "read the user's profile", lambda: client.get_displayname(UserID(user_id))
            )
        except GatewayError:
            profile = None
        # The user's own text (a remote profile may not even be a string): cleaned like a title.
        shown = clean_name(profile) if isinstance(profile, str) else ""
        return shown or user_id[1:].split(":", 1)[0]

    # !ai new

    async def new_room(self, user_id: str, agent_id: str, title: str) -> str:
        prefix = self.settings().command_prefix
        async with self._locks[user_id]:
            space_id = await self.space_of(user_id)
            if space_id is None:
                raise Refusal(f"You have no Space yet. Send `!{prefix} start` first.")
            room = await self._create_working_room(user_id, space_id, agent_id, title)
        return (
            f"New working room [{room.title}]({self.io.link(room.room_id)}) with "
            f"`{room.agent}`. I invited you to it."
        )

    async def _create_working_room(
        self, owner: str, space_id: str, agent_id: str, title: str
    ) -> WorkingRoom:
        agent = self.settings().agent(agent_id)
        assert agent is not None
        # The conversation first: a provider that refuses leaves no room without one behind.
        try:
            platform_chat_id = await self.backends.for_agent(agent).create_chat()
        except BackendError as e:
            self.log.warning("No conversation for a new room of %s from %s: %s", owner, agent.id, e)
            raise Refusal(
                f"{not_created(agent.id, e)} No working room was created; send the command "
                "again later."
            ) from e
        # Creation time orders the Space, as reconciliation orders the rooms it re-links.
        created = now_ms()
        binding = layout.Binding(
            owner=owner,
            space_id=space_id,
            agent=agent.id,
            # Every room name passes here (`!ai new` titles, the configured first title).
            title=clean_name(title) or f"Chat with {agent.name}",
            platform_chat_id=platform_chat_id,
        )
        request = layout.working_room_create_request(
            owner=owner,
            space_id=space_id,
            binding=binding,
            bot_id=self.io.bot_id,
            server_name=self.io.server_name,
            room_version=await self.room_version(),
            encrypted=encrypt_new_rooms(self.settings(), self.io.can_encrypt),
        )
        client = self.io.client
        room_id = await self.io.gateway.write(
            "create a working room", lambda: client.create_room(**request)
        )
        room = WorkingRoom(room_id, binding, layout.order_key(created), last_activity_ms=created)
        await self._link(space_id, room_id, room.order_key)
        await self.rooms.remember(room)
        await self.history.start_chat(room)
        await self._invite(owner, room_id)
        return room

    async def _link(self, space_id: str, room_id: str, order: str) -> None:
        content = layout.space_child_content(self.io.server_name, order)
        await self.io.send_state(
            "link the room into your Space", space_id, EventType.SPACE_CHILD, content, room_id
        )

    # !ai archive

    async def archive(self, room: WorkingRoom) -> None:
        await self.io.send_state(
            "unlink the room from your Space",
            room.space_id,
            EventType.SPACE_CHILD,
            layout.REMOVED,
            room.room_id,
        )
        await self.rooms.update_binding(room, archived=True)

    # invites

    async def _invite(self, user_id: str, room_id: str) -> None:
        try:
            client = self.io.client
            await self.io.gateway.write(
                "invite you", lambda: client.invite_user(RoomID(room_id), UserID(user_id))
            )
        except PermissionDenied as e:
            # Already joined or invited: nothing to do.
            self.log.debug("Invite of %s to %s skipped: %s", user_id, room_id, e.reason)

    async def _reinvite(self, user_id: str, space_id: str) -> None:
        """Invite the owner again to their Space and rooms wherever they are not a member."""
        client = self.io.client
        for room_id in [space_id] + [r.room_id for r in self.rooms.rooms_of(user_id)]:
            try:
                members = await self.io.gateway.read(
                    "read the room's members",
                    lambda rid=room_id: client.get_joined_members(RoomID(rid)),
                )
            except GatewayError:
                continue
            if user_id not in members:
                await self._invite(user_id, room_id)

    async def on_invite(self, evt: StateEvent) -> None:
        """The bot was invited: join and greet allowed users, decline the others politely."""
        io, client = self.io, self.io.client
        inviter = evt.sender
        settings = self.settings()
        prefix = settings.command_prefix
        if not self.access.may_use(inviter):
            await io.gateway.write(
                "decline the invite",
                lambda: client.leave_room(
                    evt.room_id, reason="Sorry, this Surfaces bot is not open to you."
                ),
            )
            return
        if not settings.onboarding.on_invite:
            return
        try:
            await io.gateway.write("join the room", lambda: client.join_room(evt.room_id))
        except GatewayError as e:
            self.log.warning("Could not join %s after an invite from %s: %s", evt.room_id, inviter, e)
            return
        await self.users.set_dm_room(inviter, evt.room_id)
        if settings.onboarding.auto_start and self.access.has_access(inviter):
            try:
                reply = await self.start(inviter)
            except Refusal as e:  # e.g. the agent's provider refused a conversation: say so
                reply = str(e)
            await io.send_notice(evt.room_id, reply)
            return
        await io.send_notice(
            evt.room_id,
            f"Hi! I'm Surfaces: I give you a Space of AI agent conversations. Send "
            f"`!{prefix} start` to create yours, or `!{prefix} help` for everything I can do.",
        )
