"""End-to-end encryption: a crypto-enabled bot (standalone maubot with its own device and crypto
store) and a user on a real E2EE client (matrix-nio), seen from the user's side: the bot's
device is published, and in an encrypted DM its answers arrive encrypted and decrypt."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest

from devtools.configs import dump_yaml, plugin_config
from devtools.e2e import BotFactory, MakeE2EEUser
from devtools.e2ee_user import E2EEUser, Received
from devtools.fake_openai import FakeOpenAI
from devtools.maubot_server import MaubotServer
from devtools.maubot_standalone import DEVICE_ID, BotError, StandaloneBot
from devtools.synapse import SynapseServer
from tests.e2e.conftest import PLUGIN_DIR

pytestmark = pytest.mark.e2e

# Edits as fast as the echo backend streams, so every answer shows streaming edits.
# The base config's echo agent.
ECHO_ONLY = {"streaming": {"enabled": True, "edit_interval_ms": 0}}
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


async def onboard_encrypted(
    user: E2EEUser, bot: StandaloneBot
) -> tuple[str, Received, dict[str, str]]:
    """`!ai start` in an encrypted DM, both invites accepted: (DM, answer, {kind: room id})."""
    dm, _ = await greeted_encrypted_dm(user, bot)
    asked = await user.send_text(dm, "!ai start")
    answer = await user.wait_for_reply(dm, bot.user_id, asked, "Space is ready")
    invited = await user.wait_for_invites(2)
    assert set(await user.accept_invites()) == set(invited)
    kinds = {
        (await user.room_create_content(room_id)).get("org.surfaces.kind"): room_id
        for room_id in invited
    }
    return dm, answer, kinds


async def test_start_in_encrypted_dm_creates_space_and_room(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    dm, answer, kinds = await onboard_encrypted(alice, bot)

    assert answer.encrypted and answer.decrypted
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


async def test_full_server_crypto_client_answers_and_is_cross_signed_with_a_recovery_key(
    maubot_server: MaubotServer, surfaces_mbp: Path, make_e2ee_user: MakeE2EEUser
) -> None:
    """The operator's path in the README: a client with a device id, then the manager's
    "Generate recovery key", which cross-signs the bot's device; `!ai status` says so."""
    maubot_server.upload_plugin(surfaces_mbp)
    bot = maubot_server.register_bot(device_id=DEVICE_ID)
    assert maubot_server.get_client(bot)["fingerprint"], "maubot did not enable crypto"
    alice = await make_e2ee_user()
    config = dump_yaml(plugin_config({"access": {"admins": [alice.user_id]}}))
    maubot_server.create_instance("surfaces", bot, "org.surfaces.bot", config_yaml=config)
    dm = await alice.create_encrypted_dm(bot)

    asked = await alice.send_text(dm, "!ai status")
    before = await alice.wait_for_reply(dm, bot, asked, "Surfaces status")
    _, made = maubot_server.api("POST", f"/client/{quote(bot)}/generate_recovery_key")
    assert made["recovery_key"]
    asked = await alice.send_text(dm, "!ai status")
    after = await alice.wait_for_reply(dm, bot, asked, "Surfaces status")

    assert before.encrypted and before.decrypted
    assert f"encryption: on, device `{DEVICE_ID}` (not cross-signed)" in before.body
    assert f"encryption: on, device `{DEVICE_ID}` (cross-signed)" in after.body
    await assert_nothing_plaintext_from(alice, dm, bot)


def test_encryption_on_without_crypto_is_refused_naming_the_key(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    bot = StandaloneBot(
        synapse,
        {**ECHO_ONLY, "spaces": {"encryption": "on"}},
        data_dir=tmp_path / "plain",
        repo_root=PLUGIN_DIR,
    )
    try:
        with pytest.raises(BotError):
            bot.start(timeout=30)
    finally:
        bot.stop()
    log = bot.log_path.read_text()
    assert "Surfaces cannot start: invalid config at `spaces.encryption`" in log
    assert "no end-to-end encryption" in log and "Fix it in the instance's config" in log


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


# ---------------------------------------------------------------------------------------------
# encrypted working rooms (spaces.encryption: auto, the bot has crypto)

UNDECRYPTABLE = "I could not read your encrypted message"


async def encrypted_working_room(user: E2EEUser, bot: StandaloneBot) -> str:
    """Onboard through an encrypted DM; the working room, joined."""
    _, _, kinds = await onboard_encrypted(user, bot)
    return kinds["working"]


def answers_to(user: E2EEUser, room_id: str, bot_id: str, event_id: str) -> list[Received]:
    """The bot's answers (originals, not edits) to one user message, by their turn marker."""
    return [
        r
        for r in user.messages(room_id)
        if r.sender == bot_id
        and r.replaces is None
        and (r.content.get("org.surfaces.turn") or {}).get("answers") == event_id
    ]


def undecryptable_notices(user: E2EEUser, room_id: str, bot_id: str) -> list[Received]:
    return [
        r for r in user.messages(room_id) if r.sender == bot_id and UNDECRYPTABLE in r.body
    ]


async def test_new_working_room_is_encrypted_and_streamed_answers_decrypt(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    room = await encrypted_working_room(alice, bot)
    assert await alice.state(room, "m.room.encryption") == {"algorithm": "m.megolm.v1.aes-sha2"}
    text = "please repeat these fifteen words back to me one at a time so the edits show"

    asked = await alice.send_text(room, text)
    answer = await alice.wait_for_reply(room, bot.user_id, asked, f"echo: {text}")

    assert answer.encrypted and answer.decrypted and answer.body != f"echo: {text}"
    edits = [r for r in alice.messages(room) if r.replaces == answer.event_id]
    assert edits and all(r.encrypted and r.decrypted for r in edits), "not streamed, or in clear"
    assert alice.latest_text(room, answer.event_id) == f"echo: {text}"
    await assert_nothing_plaintext_from(alice, room, bot.user_id)


async def test_message_sent_while_the_bot_was_down_is_answered_once(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    room = await encrypted_working_room(alice, bot)
    first = await alice.send_text(room, "before the stop")
    await alice.wait_for_reply(room, bot.user_id, first, "echo: before the stop")

    await asyncio.to_thread(bot.stop)
    missed = await alice.send_text(room, "sent while you were away")
    await asyncio.to_thread(bot.start)

    await alice.wait_for_reply(room, bot.user_id, missed, "echo: sent while you were away", 30)
    later = await alice.send_text(room, "and after")  # the positive signal after catch-up
    await alice.wait_for_reply(room, bot.user_id, later, "echo: and after")
    assert len(answers_to(alice, room, bot.user_id, missed)) == 1
    assert len(answers_to(alice, room, bot.user_id, first)) == 1
    await assert_nothing_plaintext_from(alice, room, bot.user_id)


async def test_new_session_started_while_the_bot_was_down_is_answered_or_said_once(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    """The client starts a new Megolm session while the bot is down. maubot drops the bot's first
    sync after a start, to-device events included; when the session's key arrives in that sync
    it is lost: the bot asks the sender's devices for it (nio, unlike Element, does not answer
    other users' requests), then says so once. When the key comes in a later sync (here that
    depends on Synapse's sync response cache), the message is answered once. Either way the
    user is never left without an answer or a reason, and a new session is read again."""
    alice = await make_e2ee_user()
    room = await encrypted_working_room(alice, bot)
    first = await alice.send_text(room, "before the stop")
    await alice.wait_for_reply(room, bot.user_id, first, "echo: before the stop")

    await asyncio.to_thread(bot.stop)
    alice.rotate_session(room)
    sent = await alice.send_text(room, "in a session started while you were down")
    await asyncio.to_thread(bot.start)

    outcome = await alice.wait_for_message(
        room,
        lambda r: r.sender == bot.user_id
        and (UNDECRYPTABLE in r.body or (r.content.get("org.surfaces.turn") or {}).get("answers") == sent),
        timeout=40,
    )
    assert outcome.encrypted and outcome.decrypted
    if UNDECRYPTABLE in outcome.body:
        assert "/discardsession" in outcome.body
        assert "for the key of a message" in bot.log_path.read_text()  # it asked first
    # Restarted again, the bot neither repeats the notice nor answers twice.
    await asyncio.to_thread(bot.restart)
    alice.rotate_session(room)  # what the notice tells the user to do
    again = await alice.send_text(room, "sent again in a new session")
    await alice.wait_for_reply(room, bot.user_id, again, "echo: sent again in a new session", 30)
    notices, answers = undecryptable_notices(alice, room, bot.user_id), answers_to(
        alice, room, bot.user_id, sent
    )
    assert (len(notices), len(answers)) in ((1, 0), (0, 1)), (notices, answers)


async def test_undecryptable_live_messages_get_one_notice_and_status_counts_them(
    bot_factory: BotFactory, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    bot = bot_factory({**ECHO_ONLY, "access": {"admins": [alice.user_id]}}, encryption=True)
    room = await encrypted_working_room(alice, bot)
    device = alice.client.device_store[bot.user_id][DEVICE_ID]
    alice.client.blacklist_device(device)  # the client withholds the next session's key
    alice.rotate_session(room)
    await alice.send_text(room, "the bot cannot read this")
    await alice.send_text(room, "nor this, in the same session")

    await alice.wait_for_message(
        room, lambda r: r.sender == bot.user_id and UNDECRYPTABLE in r.body, timeout=40
    )
    alice.client.unblacklist_device(device)
    alice.rotate_session(room)
    asked = await alice.send_text(room, "!ai status")
    status = await alice.wait_for_reply(room, bot.user_id, asked, "Surfaces status", 30)

    assert f"encryption: on, device `{DEVICE_ID}`" in status.body
    assert "2 undecryptable messages since start" in status.body
    assert len(undecryptable_notices(alice, room, bot.user_id)) == 1


async def test_export_in_an_encrypted_room_is_an_encrypted_attachment(
    bot: StandaloneBot, make_e2ee_user: MakeE2EEUser
) -> None:
    alice = await make_e2ee_user()
    room = await encrypted_working_room(alice, bot)
    said = await alice.send_text(room, "a line only the two of us should read")
    await alice.wait_for_reply(room, bot.user_id, said, "echo: a line only")

    asked = await alice.send_text(room, "!ai export")
    exported = await alice.wait_for_message(
        room, lambda r: r.sender == bot.user_id and r.content.get("msgtype") == "m.file", after=asked
    )

    assert exported.encrypted and "url" not in exported.content
    markdown = (await alice.download_decrypted(exported.content)).decode()
    assert "a line only the two of us should read" in markdown and "## Conversation" in markdown
    stored = await alice.download(exported.content["file"]["url"])
    assert b"a line only the two of us" not in stored and b"Conversation" not in stored


async def test_lost_database_rebuilds_the_encrypted_conversation_for_the_next_request(
    bot_factory: BotFactory, make_e2ee_user: MakeE2EEUser
) -> None:
    async with FakeOpenAI() as fake:
        config = {
            "backends": [
                {"id": "fake", "type": "openai", "base_url": fake.base_url, "api_key": "sk-test"}
            ],
            "agents": [
                {"id": "gpt", "name": "GPT", "backend": "fake", "model": "fake-model",
                 "system_prompt": "You are a helpful assistant."}
            ],
            "default_agent": "gpt",
            "streaming": {"enabled": False},
        }
        bot = bot_factory(config, encryption=True)
        alice = await make_e2ee_user()
        room = await encrypted_working_room(alice, bot)
        for text in ("my name is Alice", "I live in Lyon"):
            asked = await alice.send_text(room, text)
            await alice.wait_for_reply(room, bot.user_id, asked, "")
        before = [(m["role"], m["content"]) for m in fake.bodies[-1]["messages"][1:]]
        answer = await alice.wait_for_message(
            room, lambda r: (r.content.get("org.surfaces.turn") or {}).get("answers") == asked
        )
        turns = before + [("assistant", answer.body)]

        await asyncio.to_thread(bot.stop)
        dropped = bot.drop_plugin_tables()
        assert {"messages", "rooms"} <= set(dropped), dropped
        await asyncio.to_thread(bot.start)
        asked = await alice.send_text(room, "where do I live?")
        await alice.wait_for_reply(room, bot.user_id, asked, "", 30)

        carried = [(m["role"], m["content"]) for m in fake.bodies[-1]["messages"][1:]]
        assert len(turns) == 4 and carried == turns + [("user", "where do I live?")]
