"""End-to-end encryption: a crypto-enabled bot (standalone maubot with its own device and crypto
store) and a user on a real E2EE client (matrix-nio), seen from the user's side: the bot's
device is published, and in an encrypted DM its answers arrive encrypted and decrypt."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from devtools.e2e import BotFactory, MakeE2EEUser
from devtools.e2ee_user import E2EEUser, Received
from devtools.maubot_server import MaubotServer
from devtools.maubot_standalone import DEVICE_ID, StandaloneBot

pytestmark = pytest.mark.e2e

ECHO_AGENT = {
    "id": "echo",
    "name": "Echo",
    "description": "Repeats what you say.",
    "backend": "echo",
    "model": "",
    "system_prompt": "You are a helpful assistant.",
    "context_tokens": 4096,
    "temperature": 0.7,
}
ECHO_ONLY = {"agents": [ECHO_AGENT], "default_agent": "echo"}
GREETING = "Hi! I'm Surfaces"


@pytest.fixture
def bot(bot_factory: BotFactory) -> StandaloneBot:
    return bot_factory(ECHO_ONLY, encryption=True)


def _crypto_tables(bot: StandaloneBot) -> set[str]:
    with sqlite3.connect(bot.data_dir / "bot.db") as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        return {r[0] for r in rows if r[0].startswith(("crypto_", "mx_"))}


async def greeted_encrypted_dm(user: E2EEUser, bot: StandaloneBot) -> tuple[str, Received]:
    """An encrypted DM with the bot, once its greeting (its first message there) arrived."""
    dm = await user.create_encrypted_dm(bot.user_id)
    greeting = await user.wait_for_message(
        dm, lambda r: r.sender == bot.user_id and GREETING in r.body, timeout=20
    )
    return dm, greeting


async def assert_nothing_plaintext_from(user: E2EEUser, room_id: str, sender: str) -> None:
    """On the wire, every message the sender put in the room is `m.room.encrypted`."""
    raw = await user.raw_messages(room_id)
    sent = [e for e in raw if e["sender"] == sender and "state_key" not in e]
    assert sent, "the bot sent nothing"
    assert {e["type"] for e in sent} == {"m.room.encrypted"}, sent


def test_crypto_bot_publishes_device_and_keeps_it_across_restarts(bot: StandaloneBot) -> None:
    keys = bot.device_keys()
    assert keys is not None and keys["device_id"] == DEVICE_ID
    assert set(keys["keys"]) == {f"curve25519:{DEVICE_ID}", f"ed25519:{DEVICE_ID}"}
    tables = _crypto_tables(bot)
    assert "crypto_account" in tables

    bot.stop()
    dropped = bot.drop_plugin_tables()
    bot.start()

    assert dropped and not set(dropped) & tables
    assert _crypto_tables(bot) == tables
    assert bot.device_keys() == keys, "the bot came back as another device identity"


async def test_help_in_encrypted_dm(bot: StandaloneBot, make_e2ee_user: MakeE2EEUser) -> None:
    alice = await make_e2ee_user()
    dm, greeting = await greeted_encrypted_dm(alice, bot)
    assert greeting.encrypted and greeting.decrypted

    asked = await alice.send_text(dm, "!ai help")
    answer = await alice.wait_for_reply(dm, bot.user_id, asked, "Surfaces commands")

    assert answer.encrypted and answer.decrypted
    assert answer.content["msgtype"] == "m.notice"
    assert "`!ai start`" in alice.latest_text(dm, answer.event_id)
    await assert_nothing_plaintext_from(alice, dm, bot.user_id)


async def test_start_in_encrypted_dm_creates_space_and_room(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    dm, _ = await greeted_encrypted_dm(alice, bot)

    asked = await alice.send_text(dm, "!ai start")
    answer = await alice.wait_for_reply(dm, bot.user_id, asked, "Space is ready")
    assert answer.encrypted and answer.decrypted

    invited = await alice.wait_for_invites(2)
    assert set(await alice.accept_invites()) == set(invited)
    kinds = {
        (await alice.room_create_content(room_id)).get("org.surfaces.kind"): room_id
        for room_id in invited
    }
    assert set(kinds) == {"space", "working"}, kinds
    text = alice.latest_text(dm, answer.event_id)
    for room_id in kinds.values():
        assert room_id in text or room_id.replace("!", "%21") in text
        assert alice.membership(room_id, alice.user_id) == "join"
    await assert_nothing_plaintext_from(alice, dm, bot.user_id)


async def test_bot_reads_the_user_after_a_new_megolm_session(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    dm, _ = await greeted_encrypted_dm(alice, bot)
    first = await alice.send_text(dm, "!ai help")
    await alice.wait_for_reply(dm, bot.user_id, first, "Surfaces commands")

    alice.rotate_session(dm)
    second = await alice.send_text(dm, "!ai help")
    answer = await alice.wait_for_reply(dm, bot.user_id, second, "Surfaces commands")

    assert answer.encrypted and answer.decrypted
    wire = {e["event_id"]: e for e in await alice.raw_messages(dm)}
    sessions = {wire[event_id]["content"]["session_id"] for event_id in (first, second)}
    assert len(sessions) == 2, "the second message did not start a new Megolm session"


async def test_full_server_crypto_client_answers_in_encrypted_dm(
    maubot_server: MaubotServer, surfaces_mbp: Path, make_e2ee_user: MakeE2EEUser
) -> None:
    maubot_server.upload_plugin(surfaces_mbp)
    bot = maubot_server.register_bot(device_id=DEVICE_ID)
    assert maubot_server.get_client(bot)["fingerprint"], "maubot did not enable crypto"
    maubot_server.create_instance("surfaces", bot, "org.surfaces.bot")
    alice = await make_e2ee_user()
    dm = await alice.create_encrypted_dm(bot)

    asked = await alice.send_text(dm, "!ai help")
    answer = await alice.wait_for_reply(dm, bot, asked, "Surfaces commands")

    assert answer.encrypted and answer.decrypted
    await assert_nothing_plaintext_from(alice, dm, bot)


async def test_harness_encrypted_attachment_round_trip(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    """The E2EE user's own attachments: uploaded encrypted, decrypted by `download_decrypted`
    (so the helper is proven before a test relies on it for what the bot sends)."""
    alice = await make_e2ee_user()
    dm, _ = await greeted_encrypted_dm(alice, bot)
    data = "notes: ünïcode and bytes \x00\x01".encode()

    sent = await alice.send_file(dm, data, "notes.md", "text/markdown")
    seen = await alice.wait_for_message(dm, lambda r: r.event_id == sent)

    assert seen.encrypted and seen.decrypted and "url" not in seen.content
    assert await alice.download_decrypted(seen.content) == data
