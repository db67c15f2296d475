"""A test user with real end-to-end encryption: matrix-nio's AsyncClient (vodozemac) and its store.

Where `MatrixUser` speaks plain HTTP, this user runs a client nobody here wrote, so tests show
what an E2EE user (Element and the like) observes: messages it sends are Megolm-encrypted, and
what the bot sends is read only after decryption. `Received.encrypted` tells whether an event
arrived as `m.room.encrypted` on the wire; `raw_messages()` shows the undecrypted timeline.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    EnableEncryptionBuilder,
    Event,
    MegolmEvent,
    RoomCreateError,
    RoomPreset,
    SyncResponse,
    UploadResponse,
)
from nio.crypto.attachments import decrypt_attachment

from devtools.synapse import SynapseServer

# Large enough that a test never sees a gapped timeline; no lazy loading, so nio knows every
# member of an encrypted room (it shares room keys with exactly those).
_SYNC_FILTER: dict[str, Any] = {
    "room": {"timeline": {"limit": 500}, "state": {"lazy_load_members": False}},
    "presence": {"not_types": ["*"]},
}


class E2EEError(RuntimeError):
    """A request of the E2EE user failed."""


@dataclass
class Received:
    """One timeline event as the user sees it: decrypted when it could be."""

    event_id: str
    sender: str
    type: str  # after decryption ("m.room.message"); "m.room.encrypted" while undecryptable
    content: dict[str, Any]
    encrypted: bool  # arrived as m.room.encrypted on the wire
    decrypted: bool  # encrypted and successfully decrypted

    @property
    def body(self) -> str:
        return str(self.content.get("body", ""))

    @property
    def replaces(self) -> str | None:
        """The event id this one edits (`m.replace`), if it is an edit."""
        rel = self.content.get("m.relates_to") or {}
        return rel.get("event_id") if rel.get("rel_type") == "m.replace" else None


Predicate = Callable[[Received], bool]


class E2EEUser:
    """One device of a user, syncing in the background. Build with `await E2EEUser.register(...)`."""

    def __init__(
        self,
        homeserver_url: str,
        user_id: str,
        device_id: str,
        access_token: str,
        store_dir: Path,
    ) -> None:
        self.homeserver_url = homeserver_url.rstrip("/")
        self.user_id = user_id
        self.device_id = device_id
        store_dir.mkdir(parents=True, exist_ok=True)
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.client = AsyncClient(
            self.homeserver_url, user_id, device_id, str(store_dir), config=config
        )
        self.client.restore_login(user_id, device_id, access_token)  # loads the crypto store
        self.timeline: dict[str, list[Received]] = {}
        self.sync_count = 0
        self._undecrypted: dict[str, tuple[str, MegolmEvent]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.client.add_response_callback(self._on_response)  # every response, key uploads too

    @classmethod
    async def register(
        cls,
        synapse: SynapseServer,
        store_dir: Path,
        localpart: str | None = None,
        password: str = "password",
        device_id: str | None = None,
    ) -> E2EEUser:
        """A fresh account logged in as `device_id`, syncing, its device keys uploaded."""
        localpart = localpart or f"e2ee-{secrets.token_hex(4)}"
        device_id = device_id or f"E2EE{secrets.token_hex(3).upper()}"
        await asyncio.to_thread(synapse.register_user, localpart, password)
        token = await asyncio.to_thread(synapse.login, localpart, password, device_id)
        user = cls(synapse.url, synapse.user_id(localpart), device_id, token, store_dir)
        return await user.start()

    async def start(self) -> E2EEUser:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.client.access_token}"}
            )
        if self._sync_task is None:
            self._sync_task = asyncio.create_task(
                self.client.sync_forever(timeout=30000, sync_filter=_SYNC_FILTER, full_state=True),
                name=f"nio sync {self.user_id}",
            )
            # Until the device keys are on the server nobody can encrypt to this device.
            await self.wait_until(
                lambda: self.sync_count > 0 and not self.client.should_upload_keys,
                timeout=30,
                what="first sync and key upload",
            )
        return self

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except (asyncio.CancelledError, Exception):
                pass  # the loop's own errors don't matter once we are closing
            self._sync_task = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.client.close()

    # -- sync --------------------------------------------------------------------------------------

    async def _on_response(self, response: Any) -> None:
        if isinstance(response, SyncResponse):
            # nio has already replaced the Megolm events it could decrypt by their plaintext.
            for room_id, info in response.rooms.join.items():
                for event in [*info.state, *info.timeline.events]:
                    self._record(room_id, event)
            self._retry_undecrypted()  # a room key may come after the message it opens
            self.sync_count += 1
        async with self._changed:
            self._changed.notify_all()

    def _record(self, room_id: str, event: Event) -> None:
        event_id = getattr(event, "event_id", None)
        if not event_id:
            return
        events = self.timeline.setdefault(room_id, [])
        if any(r.event_id == event_id for r in events):
            return
        if isinstance(event, MegolmEvent):
            self._undecrypted[event_id] = (room_id, event)
            record = Received(event_id, event.sender, "m.room.encrypted", {}, True, False)
        else:
            source = event.source
            encrypted = bool(getattr(event, "decrypted", False))
            record = Received(
                event_id,
                source.get("sender", ""),
                source.get("type", ""),
                dict(source.get("content", {})),
                encrypted,
                encrypted,
            )
        events.append(record)

    def _retry_undecrypted(self) -> None:
        for event_id, (room_id, megolm) in list(self._undecrypted.items()):
            try:
                event = self.client.decrypt_event(megolm)
            except Exception:
                continue  # still no key for it
            if isinstance(event, MegolmEvent) or not hasattr(event, "source"):
                continue
            del self._undecrypted[event_id]
            for index, record in enumerate(self.timeline[room_id]):
                if record.event_id == event_id:
                    source = event.source
                    self.timeline[room_id][index] = Received(
                        event_id,
                        megolm.sender,
                        source.get("type", ""),
                        dict(source.get("content", {})),
                        True,
                        True,
                    )

    # -- waiting -----------------------------------------------------------------------------------

    async def wait_until(
        self, check: Callable[[], Any], timeout: float = 15.0, what: str = "condition"
    ) -> Any:
        """Wait until `check()` is truthy after some response (checked right away too)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                value = check()
                if value:
                    return value
                if self._sync_task is not None and self._sync_task.done():
                    raise E2EEError(f"{self.user_id}: sync stopped: {self._sync_task!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.user_id}: timed out after {timeout}s: {what}")
                try:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass

    def messages(self, room_id: str, after: str | None = None) -> list[Received]:
        """Timeline events seen in a room (decrypted where possible), optionally after an event."""
        events = list(self.timeline.get(room_id, []))
        if after is None:
            return events
        ids = [r.event_id for r in events]
        return events[ids.index(after) + 1 :] if after in ids else []

    async def wait_for_message(
        self,
        room_id: str,
        predicate: Predicate,
        timeout: float = 15.0,
        after: str | None = None,
    ) -> Received:
        """The first event (decrypted when it could be) matching predicate, seen ones included."""

        def find() -> Received | None:
            return next((r for r in self.messages(room_id, after) if predicate(r)), None)

        return await self.wait_until(find, timeout, f"a matching event in {room_id}")

    async def wait_for_reply(
        self,
        room_id: str,
        sender: str,
        after: str,
        contains: str = "",
        timeout: float = 15.0,
    ) -> Received:
        """A decrypted original `m.room.message` by `sender` after event `after` whose latest
        text (edits followed) contains `contains`."""

        def match(r: Received) -> bool:
            return (
                r.sender == sender
                and r.type == "m.room.message"
                and r.replaces is None
                and contains in self.latest_text(room_id, r.event_id)
            )

        return await self.wait_for_message(room_id, match, timeout, after)

    def latest_text(self, room_id: str, event_id: str) -> str:
        """A message's body after its sender's `m.replace` edits (the last one wins)."""
        events = self.timeline.get(room_id, [])
        original = next((r for r in events if r.event_id == event_id), None)
        if original is None:
            raise KeyError(f"event {event_id} not seen in {room_id}")
        text = original.body
        for r in events:
            if r.replaces == event_id and r.sender == original.sender:
                text = str(r.content.get("m.new_content", {}).get("body", text))
        return text

    def membership(self, room_id: str, user_id: str) -> str | None:
        """A member's current membership as this client knows it."""
        room = self.client.rooms.get(room_id)
        if room is None:
            return None
        if user_id in room.invited_users:
            return "invite"
        return "join" if user_id in room.users else None

    # -- rooms -------------------------------------------------------------------------------------

    async def create_encrypted_dm(self, bot_id: str, timeout: float = 20.0) -> str:
        """A direct chat with Megolm on from its first event; returns once `bot_id` has joined."""
        resp = await self.client.room_create(
            is_direct=True,
            preset=RoomPreset.trusted_private_chat,
            invite=[bot_id],
            initial_state=[EnableEncryptionBuilder().as_dict()],
        )
        if isinstance(resp, RoomCreateError):
            raise E2EEError(f"createRoom: {resp}")
        await self.wait_until(
            lambda: self.membership(resp.room_id, bot_id) == "join",
            timeout,
            f"{bot_id} to join {resp.room_id}",
        )
        return str(resp.room_id)

    async def wait_for_invites(self, count: int = 1, timeout: float = 15.0) -> list[str]:
        """Room ids of pending invites, once there are at least `count`."""
        await self.wait_until(
            lambda: len(self.client.invited_rooms) >= count, timeout, f"{count} invite(s)"
        )
        return list(self.client.invited_rooms)

    async def accept_invites(self) -> list[str]:
        """Join every room we are invited to (nio does not auto-join); returns their ids."""
        rooms = list(self.client.invited_rooms)
        for room_id in rooms:
            await self.join(room_id)
        return rooms

    async def join(self, room_id: str, timeout: float = 15.0) -> str:
        """Join and wait until our sync shows us in the room (so sends there can encrypt)."""
        resp = await self.client.join(room_id)
        if not hasattr(resp, "room_id"):
            raise E2EEError(f"join {room_id}: {resp}")
        await self.wait_until(
            lambda: (
                room_id in self.client.rooms and self.membership(room_id, self.user_id) == "join"
            ),
            timeout,
            f"our join of {room_id}",
        )
        return room_id

    async def room_create_content(self, room_id: str) -> dict[str, Any]:
        """The room's m.room.create content (Surfaces marks its rooms there)."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.create/"
        return dict(await self._get(path))

    # -- sending -----------------------------------------------------------------------------------

    async def send_text(
        self, room_id: str, body: str, msgtype: str = "m.text", timeout: float = 15.0
    ) -> str:
        """Send a message (encrypted in an encrypted room); returns its event id."""
        room = self.client.rooms.get(room_id)
        if room is None:
            raise E2EEError(f"not in {room_id} (join it first)")
        if room.encrypted:
            await self._know_devices(room_id, timeout)
        resp = await self.client.room_send(
            room_id,
            "m.room.message",
            {"msgtype": msgtype, "body": body},
            # No verification in tests: share the room key with every device of every member.
            ignore_unverified_devices=True,
        )
        if not hasattr(resp, "event_id"):
            raise E2EEError(f"send to {room_id}: {resp}")
        return str(resp.event_id)

    async def _know_devices(self, room_id: str, timeout: float) -> None:
        """Wait until nio knows a device of every other member: it shares the room key only
        with devices it knows, and it learns of a new member's devices one sync later."""
        room = self.client.rooms[room_id]
        others = [u for u in room.users if u != self.user_id and u not in room.invited_users]

        def unknown() -> list[str]:
            return [u for u in others if not self.client.device_store.active_user_devices(u)]

        deadline = time.monotonic() + timeout
        while missing := unknown():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.user_id}: no device keys for {missing} in {room_id}")
            assert self.client.olm is not None
            self.client.olm.users_for_key_query.update(missing)
            await self.client.keys_query()
            if unknown():
                await asyncio.sleep(0.2)  # the other side has not uploaded keys yet

    async def send_file(
        self,
        room_id: str,
        data: bytes,
        name: str,
        mimetype: str = "application/octet-stream",
        msgtype: str = "m.file",
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Upload `data` encrypted (nio) and send it as an `m.file` (or `msgtype`: `m.image`…)
        with `file`, as an E2EE client does in an encrypted room; returns the event id.
        `extra`: more content keys (e.g. the voice-message flag)."""
        upload, keys = await self.client.upload(
            io.BytesIO(data), mimetype, name, encrypt=True, filesize=len(data)
        )
        if not isinstance(upload, UploadResponse) or keys is None:
            raise E2EEError(f"upload {name}: {upload}")
        content = {
            "msgtype": msgtype,
            "body": name,
            "filename": name,
            "info": {"mimetype": mimetype, "size": len(data)},
            "file": {**keys, "url": upload.content_uri},
            **(extra or {}),
        }
        room = self.client.rooms.get(room_id)
        if room is not None and room.encrypted:
            await self._know_devices(room_id, 15.0)
        resp = await self.client.room_send(
            room_id, "m.room.message", content, ignore_unverified_devices=True
        )
        if not hasattr(resp, "event_id"):
            raise E2EEError(f"send to {room_id}: {resp}")
        return str(resp.event_id)

    def rotate_session(self, room_id: str) -> None:
        """Discard this device's outbound Megolm session: the next send starts a new one and
        shares its key again (nio's public API; it keeps a session that was never shared)."""
        self.client.invalidate_outbound_session(room_id)

    # -- reading the server ------------------------------------------------------------------------

    async def _get(self, path: str, query: dict[str, str] | None = None) -> Any:
        if self._http is None:
            raise E2EEError("E2EEUser not started")
        async with self._http.get(self.homeserver_url + path, params=query) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise E2EEError(f"GET {path} -> {resp.status}: {data}")
            return data

    async def state(self, room_id: str, event_type: str, key: str = "") -> dict[str, Any] | None:
        """One state event's content as this user reads it; None when the room has none."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(key)}"
        try:
            return await self._get(path)
        except E2EEError as e:
            if "-> 404" in str(e):
                return None
            raise

    async def raw_messages(self, room_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The room's timeline as the server returns it (`/messages`, oldest first): what is on
        the wire, nothing decrypted."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/messages"
        data = await self._get(path, {"dir": "b", "limit": str(limit)})
        return list(reversed(data.get("chunk", [])))

    async def download(self, mxc: str) -> bytes:
        """A media file's bytes as the media repository holds them (authenticated media API;
        nio's `download` uses the legacy one, which Synapse no longer serves for new media)."""
        if self._http is None:
            raise E2EEError("E2EEUser not started")
        server, _, media_id = mxc.removeprefix("mxc://").partition("/")
        path = f"/_matrix/client/v1/media/download/{_q(server)}/{_q(media_id)}"
        async with self._http.get(self.homeserver_url + path) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise E2EEError(f"GET {path} -> {resp.status}: {data[:300]!r}")
        return data

    async def download_decrypted(self, content: dict[str, Any]) -> bytes:
        """An encrypted attachment's plaintext, from an `m.file`/`m.image` content with `file`."""
        file = content["file"]
        ciphertext = await self.download(str(file["url"]))
        return bytes(
            decrypt_attachment(ciphertext, file["key"]["k"], file["hashes"]["sha256"], file["iv"])
        )

def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")
