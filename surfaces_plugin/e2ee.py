"""End-to-end encryption: what Surfaces adds to the crypto maubot (mautrix) already does.

maubot decrypts live events for plugins and encrypts what the bot sends into encrypted rooms.
It leaves the rest to us: history read with /messages comes back encrypted (`readable` decrypts
it, for `timeline.read_back`, the one reader of history), and a message whose room key never
reached the bot is only logged. `E2EE` asks the sender's devices for such a key, and when it
stays missing tells the room once per Megolm session what happened and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mautrix.errors import DecryptionError
from mautrix.types import (
    EncryptedEvent,
    EncryptedMegolmEventContent,
    Event,
    EventType,
    RoomID,
    SessionID,
    TrustState,
    UserID,
)
from mautrix.types.util import SerializerError

from . import layout
from .config import Settings
from .matrix import MatrixIO, NotFound
from .txn import txn_id

RawEvent = dict[str, Any]

ENCRYPTED_TYPE = "m.room.encrypted"
UNDECRYPTABLE_KEY = "org.surfaces.undecryptable"  # on the notice: {"session_id": …}
# How long a missing key is waited for: it may still be on its way, or a device may forward it.
SESSION_WAIT_S = 3.0
KEY_REQUEST_TIMEOUT_S = 5.0


def undecryptable_text(prefix: str) -> str:
    return (
        "I could not read your encrypted message: your client never gave me its key (this "
        "happens when it starts a new encryption session while I am offline), and none of your "
        "devices sent it when I asked. Nothing went to the agent. To fix it, make your client "
        "start a new session (in Element: send `/discardsession`), then send the message again. "
        "If your client shares keys only with verified devices, verify my device first. "
        f"I will say this once for this session; `!{prefix} help` lists the commands."
    )


def is_undecryptable(event: RawEvent) -> bool:
    """An event still encrypted after `readable`: the bot has no key for it."""
    return isinstance(event, dict) and event.get("type") == ENCRYPTED_TYPE


def session_of(event: RawEvent) -> str:
    content = event.get("content")
    session = content.get("session_id") if isinstance(content, dict) else None
    return session if isinstance(session, str) else ""


def noticed_session(event: RawEvent, bot_id: str) -> str | None:
    """The Megolm session an earlier undecryptable notice of the bot was about."""
    if not isinstance(event, dict) or event.get("sender") != bot_id:
        return None
    content = event.get("content")
    marker = content.get(UNDECRYPTABLE_KEY) if isinstance(content, dict) else None
    session = marker.get("session_id") if isinstance(marker, dict) else None
    return session if isinstance(session, str) else None


async def decrypt(io: MatrixIO, raw: RawEvent, room_id: str) -> RawEvent | None:
    """The decrypted form of one encrypted event, as /messages would have shown it; None if no key."""
    crypto = io.client.crypto
    try:
        encrypted = EncryptedEvent.deserialize({**raw, "room_id": room_id})
        if not isinstance(encrypted.content, EncryptedMegolmEventContent):
            return None
        event: Event = await crypto.decrypt_megolm_event(encrypted)
    except (DecryptionError, SerializerError, ValueError, KeyError, TypeError):
        return None  # no key, or a malformed event (remote servers send anything)
    plain = event.serialize()
    plain.setdefault("unsigned", raw.get("unsigned") or {})
    return plain


async def readable(io: MatrixIO, room_id: str, events: list[RawEvent]) -> list[RawEvent]:
    """A /messages page with what the bot can decrypt decrypted; the rest stays `m.room.encrypted`."""
    if not io.can_encrypt or not any(is_undecryptable(e) for e in events):
        return events
    out: list[RawEvent] = []
    for event in events:
        if is_undecryptable(event) and "content" in event and event["content"]:
            out.append(await decrypt(io, event, room_id) or event)
        else:
            out.append(event)
    return out


class E2EE:
    """Missing room keys, undecryptable-message notices, room encryption and crypto status."""

    def __init__(self, io: MatrixIO, settings: Callable[[], Settings], log: logging.Logger) -> None:
        self.io = io
        self.settings = settings
        self.log = log
        self.undecryptable = 0  # messages that stayed unreadable since start
        self._noticed: set[tuple[str, str]] = set()  # (room, session) told about

    # keys

    async def recover(self, room_id: str, raw: RawEvent) -> RawEvent | None:
        """Wait for the event's key, then ask the sender's devices for it; the decrypted event."""
        crypto = self.io.client.crypto
        if crypto is None or (room_id, session_of(raw)) in self._noticed:
            return None  # a session already given up on: its key is not coming
        room, session = RoomID(room_id), SessionID(session_of(raw))
        if not (
            await crypto.crypto_store.has_group_session(room, session)
            or await crypto.wait_for_session(room, session, timeout=SESSION_WAIT_S)
        ):
            await self._request_key(room_id, raw)
        return await decrypt(self.io, raw, room_id)

    async def has_key(self, evt: EncryptedEvent) -> bool:
        """The bot holds the event's Megolm session (so maubot decrypts it for the plugin)."""
        crypto = self.io.client.crypto
        return crypto is not None and await crypto.crypto_store.has_group_session(
            evt.room_id, evt.content.session_id
        )

    async def _request_key(self, room_id: str, raw: RawEvent) -> None:
        crypto = self.io.client.crypto
        content = raw.get("content") or {}
        sender = UserID(str(raw.get("sender", "")))
        device = content.get("device_id")
        devices = [device] if isinstance(device, str) else []
        if not devices:
            devices = list((await crypto.crypto_store.get_devices(sender) or {}).keys())
        if not devices:
            return
        self.log.info("Asking %s's devices for the key of a message in %s", sender, room_id)
        try:
            await crypto.request_room_key(
                RoomID(room_id),
                content.get("sender_key") or "",
                SessionID(session_of(raw)),
                {sender: devices},
                timeout=KEY_REQUEST_TIMEOUT_S,
            )
        except Exception as e:  # a failed request only means no key: the notice follows
            self.log.warning("Key request in %s failed: %s", room_id, type(e).__name__)

    # notices

    async def tell_undecryptable(
        self, room_id: str, events: list[RawEvent], already_noticed: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """Count messages that stayed unreadable; one notice per room and Megolm session, ever."""
        for raw in events:
            self.undecryptable += 1
            session = session_of(raw)
            key = (room_id, session)
            self.log.warning(
                "Could not decrypt %s in %s (session %s): no key", raw.get("event_id"), room_id, session
            )
            if key in self._noticed or session in already_noticed:
                continue
            self._noticed.add(key)
            await self.io.send_notice(
                room_id,
                undecryptable_text(self.settings().command_prefix),
                {UNDECRYPTABLE_KEY: {"session_id": session}},
                # Keyed by the session: a notice repeated after a crash is one event.
                txn=txn_id(f"{room_id}/{session}", "undecryptable"),
            )

    # rooms

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether the room is encrypted; always False for a bot that cannot encrypt."""
        if not self.io.can_encrypt:
            return False
        store = self.io.client.state_store
        known = await store.is_encrypted(RoomID(room_id)) if store is not None else None
        if known is not None:
            return known
        try:
            await self.io.gateway.read(
                "read the room's encryption",
                lambda: self.io.client.get_state_event(RoomID(room_id), EventType.ROOM_ENCRYPTION),
            )
        except NotFound:
            return False
        return True

    async def encrypt_room(self, room_id: str) -> None:
        await self.io.send_state(
            "turn on encryption",
            room_id,
            EventType.ROOM_ENCRYPTION,
            layout.ENCRYPTION_CONTENT,
        )

    async def upload(self, room_id: str, data: bytes, mime_type: str, name: str) -> dict[str, Any]:
        """Upload a file for an `m.file`; encrypted in an encrypted room. The content's media part."""
        file = None
        if await self.is_encrypted(room_id):
            # Imported here: mautrix.crypto needs maubot[encryption], absent without crypto.
            from mautrix.crypto.attachments import encrypt_attachment

            data, file = encrypt_attachment(data)
            mime_type = "application/octet-stream"
        client = self.io.client
        url = await self.io.gateway.write(
            "upload the file",
            lambda: client.upload_media(data, mime_type=mime_type, filename=name, size=len(data)),
        )
        if file is None:
            return {"url": str(url)}
        file.url = url
        return {"file": file.serialize()}

    # status

    async def status_lines(self) -> list[str]:
        crypto = self.io.client.crypto if self.io.can_encrypt else None
        if crypto is None:
            return ["- encryption: off (this maubot client has no device id or no crypto packages)"]
        try:
            trust = await crypto.resolve_trust(crypto.own_identity)
            signed = "cross-signed" if trust >= TrustState.CROSS_SIGNED_UNTRUSTED else "not cross-signed"
        except Exception:
            signed = "cross-signing unknown"
        return [
            f"- encryption: on, device `{self.io.client.device_id}` ({signed}); "
            f"{self.undecryptable} undecryptable messages since start"
        ]
