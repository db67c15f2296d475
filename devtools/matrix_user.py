"""A small async Matrix client for a human test user (aiohttp against the client-server API).

A background /sync loop records every state and timeline event per room, invites and ephemeral
events, so tests can wait for what the bot does and look back at what it already did.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

Event = dict[str, Any]
Predicate = Callable[[Event], bool]

# A timeline limit this large means a test never sees a gapped ("limited") timeline.
_SYNC_FILTER = json.dumps(
    {
        "room": {
            "timeline": {"limit": 500},
            "state": {"lazy_load_members": False},
        },
        "presence": {"not_types": ["*"]},
    }
)
_txn_ids = itertools.count()


class MatrixError(RuntimeError):
    """A client-server API call failed."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class RoomLog:
    """Everything the sync loop saw in one room, in arrival order."""

    events: list[Event] = field(default_factory=list)  # state and timeline, deduplicated
    ephemeral: list[Event] = field(default_factory=list)  # typing, receipts
    account_data: dict[str, Any] = field(default_factory=dict)
    seen_ids: set[str] = field(default_factory=set)
    arrived: dict[str, float] = field(default_factory=dict)  # event id → perf_counter at its sync

    def add(self, event: Event) -> None:
        event_id = event.get("event_id")
        if event_id:
            if event_id in self.seen_ids:
                return
            self.seen_ids.add(event_id)
            self.arrived[event_id] = time.perf_counter()
        self.events.append(event)


def is_edit(event: Event) -> bool:
    """True for an `m.replace` edit (its own event, not a new message)."""
    rel = event.get("content", {}).get("m.relates_to") or {}
    return rel.get("rel_type") == "m.replace"


def is_message(event: Event, sender: str | None = None, msgtype: str | None = None) -> bool:
    """An original (non-edit) m.room.message, optionally from a sender and of a msgtype."""
    if event.get("type") != "m.room.message" or is_edit(event):
        return False
    if sender is not None and event.get("sender") != sender:
        return False
    return msgtype is None or event.get("content", {}).get("msgtype") == msgtype


def create_content(state: list[Event]) -> dict[str, Any]:
    """The m.room.create content in a room's state (or an invite's stripped state)."""
    for event in state:
        if event.get("type") == "m.room.create":
            return dict(event.get("content", {}))
    return {}


def room_kind(state: list[Event]) -> str | None:
    """`space` or `working` for Surfaces rooms (from the create event's markers)."""
    kind = create_content(state).get("org.surfaces.kind")
    return kind if isinstance(kind, str) else None


class MatrixUser:
    """One logged-in user with a background sync loop. Use `await MatrixUser.login(...)` or `start()`."""

    def __init__(self, homeserver_url: str, user_id: str, access_token: str) -> None:
        self.homeserver_url = homeserver_url.rstrip("/")
        self.user_id = user_id
        self.access_token = access_token
        self.rooms: dict[str, RoomLog] = {}
        self.invites: dict[str, list[Event]] = {}  # room id -> stripped invite state
        self.joined: set[str] = set()
        self.left: set[str] = set()
        self.account_data: dict[str, Any] = {}
        self.next_batch: str | None = None
        self.sync_count = 0
        self._session: aiohttp.ClientSession | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._sync_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    async def login(cls, homeserver_url: str, localpart: str, password: str) -> MatrixUser:
        """Log in with a password and start syncing."""
        async with aiohttp.ClientSession() as session:
            async with session.post(
                homeserver_url.rstrip("/") + "/_matrix/client/v3/login",
                json={
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": localpart},
                    "password": password,
                },
            ) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise MatrixError("POST", "/login", resp.status, data)
        user = cls(homeserver_url, data["user_id"], data["access_token"])
        await user.start()
        return user

    async def start(self) -> MatrixUser:
        """Open the HTTP session and run /sync in the background; returns after the first sync."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.access_token}"},
                timeout=aiohttp.ClientTimeout(total=60),  # longer than the 30 s sync long-poll
            )
        if self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_loop(), name=f"sync {self.user_id}")
            await self.wait_until(lambda: self.sync_count > 0, timeout=30, what="first sync")
        return self

    async def close(self) -> None:
        """Stop syncing and close the HTTP session."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except (asyncio.CancelledError, Exception):
                pass  # the loop's own errors don't matter once we are closing
            self._sync_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MatrixUser:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- HTTP --------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        check: bool = True,
    ) -> tuple[int, Any]:
        """A client-server API call; raises MatrixError on >=300 unless check is False."""
        if self._session is None:
            raise RuntimeError("MatrixUser not started")
        url = self.homeserver_url + path
        async with self._session.request(method, url, json=body, params=query) as resp:
            try:
                data = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                data = {"raw": await resp.text()}
            if check and resp.status >= 300:
                raise MatrixError(method, path, resp.status, data)
            return resp.status, data

    @staticmethod
    def _q(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    async def download_media(self, mxc_url: str) -> tuple[bytes, str]:
        """An uploaded file's bytes and Content-Type, via the authenticated media API."""
        if self._session is None:
            raise RuntimeError("MatrixUser not started")
        if not mxc_url.startswith("mxc://"):
            raise ValueError(f"not an mxc:// URL: {mxc_url!r}")
        server, _, media_id = mxc_url[len("mxc://") :].partition("/")
        path = f"/_matrix/client/v1/media/download/{self._q(server)}/{self._q(media_id)}"
        async with self._session.get(self.homeserver_url + path) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise MatrixError("GET", path, resp.status, data[:500])
            return data, resp.headers.get("Content-Type", "")

    async def upload_media(self, data: bytes, mimetype: str, filename: str) -> str:
        """Upload a file to the homeserver's media repository, as a client does; its mxc URI."""
        if self._session is None:
            raise RuntimeError("MatrixUser not started")
        path = "/_matrix/media/v3/upload"
        async with self._session.post(
            self.homeserver_url + path,
            data=data,
            params={"filename": filename},
            headers={"Content-Type": mimetype},
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                raise MatrixError("POST", path, resp.status, body)
            return str(body["content_uri"])

    async def send_media(
        self,
        room_id: str,
        msgtype: str,
        data: bytes,
        filename: str,
        mimetype: str,
        caption: str | None = None,
        size: int | None = None,
    ) -> str:
        """Upload `data` and send it as an `m.image`/`m.file`/`m.audio` (the body is the caption
        when there is one, with `filename`); `size` overrides the declared size."""
        mxc = await self.upload_media(data, mimetype, filename)
        content: dict[str, Any] = {
            "msgtype": msgtype,
            "body": caption or filename,
            "url": mxc,
            "info": {"mimetype": mimetype, "size": len(data) if size is None else size},
        }
        if caption:
            content["filename"] = filename
        return await self.send_event(room_id, "m.room.message", content)

    # -- sync --------------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        backoff = 0.2
        while True:
            query = {"filter": _SYNC_FILTER, "timeout": "0" if self.next_batch is None else "30000"}
            if self.next_batch:
                query["since"] = self.next_batch
            try:
                _, data = await self.request("GET", "/_matrix/client/v3/sync", query=query)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a restarting homeserver: keep trying, like a real client
                self._sync_error = err
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            self._sync_error = None
            self._apply_sync(data)
            async with self._changed:
                self.sync_count += 1
                self._changed.notify_all()

    def _room(self, room_id: str) -> RoomLog:
        return self.rooms.setdefault(room_id, RoomLog())

    def _apply_sync(self, data: dict[str, Any]) -> None:
        self.next_batch = data["next_batch"]
        for event in data.get("account_data", {}).get("events", []):
            self.account_data[event["type"]] = event.get("content", {})
        rooms = data.get("rooms", {})
        for room_id, info in rooms.get("invite", {}).items():
            self.invites[room_id] = info.get("invite_state", {}).get("events", [])
        for section in ("join", "leave"):
            for room_id, info in rooms.get(section, {}).items():
                self._apply_room(room_id, info)
                if section == "join":
                    self.joined.add(room_id)
                    self.left.discard(room_id)
                    self.invites.pop(room_id, None)
                else:
                    self.joined.discard(room_id)
                    self.left.add(room_id)
                    self.invites.pop(room_id, None)

    def _apply_room(self, room_id: str, info: dict[str, Any]) -> None:
        log = self._room(room_id)
        for event in info.get("state", {}).get("events", []):
            log.add({**event, "room_id": room_id})
        for event in info.get("timeline", {}).get("events", []):
            log.add({**event, "room_id": room_id})
        for event in info.get("ephemeral", {}).get("events", []):
            log.ephemeral.append(event)
        for event in info.get("account_data", {}).get("events", []):
            log.account_data[event["type"]] = event.get("content", {})

    # -- waiting -----------------------------------------------------------------------------------

    async def wait_until(
        self, check: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
    ) -> Any:
        """Wait until `check()` is truthy after some sync (checked right away too); returns its value."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                value = check()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    extra = f" (last sync error: {self._sync_error!r})" if self._sync_error else ""
                    raise TimeoutError(
                        f"{self.user_id}: timed out after {timeout}s waiting for {what}{extra}"
                    )
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    def events(self, room_id: str) -> list[Event]:
        """Every state and timeline event seen in a room so far."""
        return list(self._room(room_id).events)

    def find(self, room_id: str, predicate: Predicate, after: str | None = None) -> Event | None:
        """The first seen event matching predicate (only events after event id `after`, if given)."""
        for event in self._after(room_id, after):
            if predicate(event):
                return event
        return None

    def _after(self, room_id: str, after: str | None) -> Iterable[Event]:
        events = self._room(room_id).events
        if after is None:
            return list(events)
        for index, event in enumerate(events):
            if event.get("event_id") == after:
                return events[index + 1 :]
        return []  # the anchor is not synced yet: nothing can be after it

    async def wait_for(
        self, room_id: str, predicate: Predicate, timeout: float = 10.0, after: str | None = None
    ) -> Event:
        """The first event matching predicate, including ones already seen."""
        return await self.wait_until(
            lambda: self.find(room_id, predicate, after), timeout, what=f"an event in {room_id}"
        )

    async def wait_for_invite(
        self, predicate: Callable[[str, list[Event]], bool] | None = None, timeout: float = 10.0
    ) -> str:
        """A room id we are invited to (optionally matching predicate(room_id, invite_state))."""

        def check() -> str | None:
            for room_id, state in self.invites.items():
                if predicate is None or predicate(room_id, state):
                    return room_id
            return None

        return await self.wait_until(check, timeout, what="an invite")

    async def wait_for_notice(
        self,
        room_id: str,
        contains: str,
        sender: str | None = None,
        timeout: float = 10.0,
        after: str | None = None,
    ) -> Event:
        """An m.notice (by sender, if given) whose latest text contains `contains`."""

        def match(event: Event) -> bool:
            return is_message(event, sender, "m.notice") and contains in self.latest_text(
                room_id, event
            )

        return await self.wait_for(room_id, match, timeout, after)

    async def wait_for_membership(
        self, room_id: str, user_id: str, membership: str = "join", timeout: float = 10.0
    ) -> Event:
        """The m.room.member event putting user_id into `membership` (e.g. the bot joining)."""

        def match(event: Event) -> bool:
            return (
                event.get("type") == "m.room.member"
                and event.get("state_key") == user_id
                and event.get("content", {}).get("membership") == membership
            )

        return await self.wait_for(room_id, match, timeout)

    async def open_dm(self, bot_mxid: str, timeout: float = 15.0) -> str:
        """create_dm and wait until the other side (an autojoining bot) has joined."""
        room_id = await self.create_dm(bot_mxid)
        await self.wait_for_membership(room_id, bot_mxid, "join", timeout)
        return room_id

    async def command(
        self, room_id: str, text: str, bot_mxid: str, timeout: float = 15.0, quiet: float = 0.5
    ) -> list[str]:
        """Send text and return the final texts (after edits) of the bot's replies to it."""
        event_id = await self.send_text(room_id, text)
        replies = await self.collect_replies(room_id, event_id, bot_mxid, timeout, quiet)
        return [self.latest_text(room_id, reply) for reply in replies]

    def _event(self, room_id: str, event: Event | str) -> Event:
        if not isinstance(event, str):
            return event
        found = self.find(room_id, lambda e: e.get("event_id") == event)
        if found is None:
            raise KeyError(f"event {event} not seen in {room_id}")
        return found

    def edits(self, room_id: str, event: Event | str) -> list[Event]:
        """The `m.replace` edits of a message by its own sender, in arrival order."""
        original = self._event(room_id, event)
        result = []
        for other in self._room(room_id).events:
            rel = other.get("content", {}).get("m.relates_to") or {}
            if (
                rel.get("rel_type") == "m.replace"
                and rel.get("event_id") == original.get("event_id")
                and other.get("sender") == original.get("sender")
            ):
                result.append(other)
        return result

    def latest_text(self, room_id: str, event: Event | str) -> str:
        """A message's text after edits: the `m.new_content` body of its last edit."""
        original = self._event(room_id, event)
        text = str(original.get("content", {}).get("body", ""))
        for edit in self.edits(room_id, original):
            text = str(edit["content"].get("m.new_content", {}).get("body", text))
        return text

    def messages(
        self, room_id: str, sender: str | None = None, after: str | None = None
    ) -> list[Event]:
        """Original (non-edit) messages in timeline order, optionally by sender / after an event."""
        return [e for e in self._after(room_id, after) if is_message(e, sender)]

    async def wait_for_text(
        self, room_id: str, event_id: str, predicate: Callable[[str], bool], timeout: float = 10.0
    ) -> str:
        """Wait until a message's latest text (after edits) satisfies predicate; returns it."""

        def check() -> str | None:
            if self.find(room_id, lambda e: e.get("event_id") == event_id) is None:
                return None
            text = self.latest_text(room_id, event_id)
            return text if predicate(text) else None

        return await self.wait_until(check, timeout, what=f"text of {event_id}")

    async def collect_replies(
        self,
        room_id: str,
        after: str,
        sender: str,
        timeout: float = 10.0,
        quiet: float = 1.0,
    ) -> list[Event]:
        """Messages from `sender` after event `after`: waits for the first, then until nothing new
        (message or edit) arrives for `quiet` seconds. Read final texts with `latest_text`."""
        await self.wait_for(room_id, lambda e: is_message(e, sender), timeout, after)
        deadline = time.monotonic() + timeout
        seen = len(self._room(room_id).events)
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            now = len(self._room(room_id).events)
            if now == seen:
                break
            seen = now
        return self.messages(room_id, sender, after)

    # -- actions -----------------------------------------------------------------------------------

    async def create_room(self, **body: Any) -> str:
        _, data = await self.request("POST", "/_matrix/client/v3/createRoom", body)
        return str(data["room_id"])

    async def create_dm(self, other_mxid: str) -> str:
        """A private room with an is_direct invite, recorded in m.direct like Element does."""
        room_id = await self.create_room(
            preset="trusted_private_chat", is_direct=True, invite=[other_mxid]
        )
        direct = dict(self.account_data.get("m.direct", {}))
        direct[other_mxid] = [*direct.get(other_mxid, []), room_id]
        path = f"/_matrix/client/v3/user/{self._q(self.user_id)}/account_data/m.direct"
        await self.request("PUT", path, direct)
        return room_id

    async def join(self, room_id: str) -> str:
        _, data = await self.request("POST", f"/_matrix/client/v3/join/{self._q(room_id)}", {})
        return str(data["room_id"])

    async def leave(self, room_id: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{self._q(room_id)}/leave", {})

    async def invite(self, room_id: str, user_id: str) -> None:
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/invite"
        await self.request("POST", path, {"user_id": user_id})

    async def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        txn = f"devtools.{time.time_ns()}.{next(_txn_ids)}"
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/send/{self._q(event_type)}/{txn}"
        _, data = await self.request("PUT", path, content)
        return str(data["event_id"])

    async def send_text(self, room_id: str, text: str, msgtype: str = "m.text") -> str:
        return await self.send_event(room_id, "m.room.message", {"msgtype": msgtype, "body": text})

    async def edit_text(self, room_id: str, event_id: str, text: str) -> str:
        """Edit one of our messages in place (m.replace)."""
        return await self.send_event(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": f"* {text}",
                "m.new_content": {"msgtype": "m.text", "body": text},
                "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
            },
        )

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        """React to a message with `key` (an `m.annotation`, as clients send reactions)."""
        relates = {"rel_type": "m.annotation", "event_id": event_id, "key": key}
        return await self.send_event(room_id, "m.reaction", {"m.relates_to": relates})

    async def redact(self, room_id: str, event_id: str, reason: str | None = None) -> str:
        txn = f"devtools.{time.time_ns()}.{next(_txn_ids)}"
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/redact/{self._q(event_id)}/{txn}"
        _, data = await self.request("PUT", path, {"reason": reason} if reason else {})
        return str(data["event_id"])

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> int:
        """Send a state event; returns the HTTP status (tests assert 403 where power forbids it)."""
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/state/{self._q(event_type)}/{self._q(state_key)}"
        status, _ = await self.request("PUT", path, content, check=False)
        return status

    async def get_state(self, room_id: str) -> list[Event]:
        """The room's current state from the server (can be stale after being kicked)."""
        _, data = await self.request("GET", f"/_matrix/client/v3/rooms/{self._q(room_id)}/state")
        return list(data)

    async def get_state_event(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        """One state event's content, or None when it does not exist (404)."""
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/state/{self._q(event_type)}/{self._q(state_key)}"
        status, data = await self.request("GET", path, check=False)
        if status == 404:
            return None
        if status >= 300:
            raise MatrixError("GET", path, status, data)
        return dict(data)

    async def joined_rooms(self) -> list[str]:
        _, data = await self.request("GET", "/_matrix/client/v3/joined_rooms")
        return list(data["joined_rooms"])

    async def set_typing(self, room_id: str, typing: bool, timeout_ms: int = 10000) -> None:
        path = f"/_matrix/client/v3/rooms/{self._q(room_id)}/typing/{self._q(self.user_id)}"
        body: dict[str, Any] = {"typing": typing}
        if typing:
            body["timeout"] = timeout_ms
        await self.request("PUT", path, body)
