"""Security on a real Synapse: forged layout is not trusted, other users cannot reach someone's
conversation or notes, admin commands stay with admins, blocked users get one refusal, and
secrets (API keys, access tokens) never reach logs or rooms."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_anthropic import FakeAnthropic
from devtools.fake_openai import FakeOpenAI
from devtools.fake_responses import FakeResponses
from devtools.matrix_user import MatrixUser, create_content, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.mcp_server import McpTestServer
from devtools.synapse import SynapseServer

from .invariants import TURN, BotView, check_answers, onboard
from .test_reliability import API_KEY, FAST_STREAM, answer_of, ask, fake_backend_config

pytestmark = pytest.mark.e2e


async def bot_texts_until(
    user: MatrixUser, room: str, bot: StandaloneBot, sent: str, command: str, expect: str
) -> list[str]:
    """The bot's messages in `room` since `sent`, once it has answered a later `command` (the
    positive signal that what came before was handled): no fixed quiet window."""
    await ask(user, room, command, expect, bot)
    return [user.latest_text(room, e) for e in user.messages(room, bot.user_id, after=sent)]


async def binding(user: MatrixUser, room: str) -> dict:
    content = await user.get_state_event(room, "org.surfaces.binding")
    assert content is not None
    return content


async def test_forged_surfaces_room_is_not_routed(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    """alice creates a room that claims to be a working room (create markers and a binding she
    sent herself) and invites the bot: nothing there is trusted, before or after a restart."""
    bot = bot_factory(FAST_STREAM)
    alice = await make_user()
    _dm, space, _room = await onboard(alice, bot)
    forged = await alice.create_room(
        preset="private_chat",
        invite=[bot.user_id],
        creation_content={
            "org.surfaces.kind": "working",
            "org.surfaces.owner": alice.user_id,
            "org.surfaces.v": 1,
        },
        initial_state=[
            {
                "type": "org.surfaces.binding",
                "state_key": "",
                "content": {
                    "v": 1,
                    "owner": alice.user_id,
                    "space_id": space,
                    "agent": "echo",
                    "platform_chat_id": "echo-forged",
                    "title": "Forged",
                },
            },
            {"type": "m.space.parent", "state_key": space, "content": {"via": ["localhost"]}},
        ],
    )
    await alice.wait_for_membership(forged, bot.user_id, "join", timeout=15)
    await alice.wait_for_notice(forged, "Hi!", bot.user_id, 15)  # its greeting, as in any DM

    for attempt in range(2):
        sent = await alice.send_text(forged, f"route me {attempt}")
        texts = await bot_texts_until(alice, forged, bot, sent, "!ai rooms", "working rooms")
        assert len(texts) == 1, texts  # only the answer to the command: the message was not routed
        [rooms] = texts
        assert "Forged" not in rooms and "echo-forged" not in rooms
        assert not any(
            TURN in e["content"] for e in alice.messages(forged, bot.user_id, after=sent)
        )
        space_children = [
            e["state_key"] for e in await alice.get_state(space) if e["type"] == "m.space.child"
        ]
        assert forged not in space_children
        if attempt == 0:
            bot.restart()  # reconciliation reads the forged state too: still not trusted


async def test_other_users_cannot_reach_alices_conversation_notes_or_admin_commands(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory(FAST_STREAM)
    alice = await make_user()
    bob = await make_user()
    alice_dm, alice_space, room = await onboard(alice, bot)
    assert await answer_of(alice, room, bot, "my private question") == "echo: my private question"
    await ask(alice, alice_dm, "!ai memory add alice's secret note", "Noted", bot)
    await ask(alice, room, "!ai system You serve alice.", "system prompt is set", bot)
    before = await binding(alice, room)

    # alice invites bob into her working room.
    await alice.invite(room, bob.user_id)
    await bob.join(room)
    refused = "works in one of your working rooms"
    sent = await bob.send_text(room, "answer me instead")
    texts = await bot_texts_until(bob, room, bot, sent, "!ai context", refused)
    assert len(texts) == 2 and "only they can talk to the agent" in texts[0], texts
    assert refused in texts[1], texts  # nothing else: no answer to bob
    sent = await bob.send_text(room, "and again")
    texts = await bot_texts_until(bob, room, bot, sent, "!ai context", refused)
    assert len(texts) == 1 and refused in texts[0], texts  # told once, then ignored

    for command in (
        "!ai reset",
        "!ai export",
        "!ai system You serve bob now.",
        "!ai agent echo",
        "!ai archive",
        "!ai retry",
        "!ai compact",
        "!ai context",
    ):
        reply = await ask(bob, room, command, "works in one of your working rooms", bot)
        assert "secret" not in reply and "You serve alice" not in reply, (command, reply)
    await asyncio.sleep(1)
    assert await binding(alice, room) == before
    # Nothing but those refusals and the one notice came from the bot since bob joined.
    uploads = [e for e in bob.messages(room, bot.user_id) if e["content"].get("msgtype") == "m.file"]
    assert uploads == []
    # The layout is the bot's alone: bob cannot write it either.
    assert await bob.send_state(room, "org.surfaces.binding", "", {**before, "owner": bob.user_id}) == 403
    assert await bob.send_state(room, "m.space.parent", "!x:localhost", {"via": ["localhost"]}) == 403

    # bob's own commands show only his own things.
    bob_dm, _bob_space, bob_room = await onboard(bob, bot)
    await ask(bob, bob_dm, "!ai memory add bob's note", "Noted", bot)
    rooms = await ask(bob, bob_dm, "!ai rooms", "working rooms", bot)
    assert rooms.count("General") == 1 and room not in rooms, rooms
    memory = await ask(bob, bob_dm, "!ai memory", "shared notes", bot)
    assert "bob's note" in memory and "secret" not in memory, memory
    for command in ("!ai status", f"!ai admin approve {bob.user_id}", "!ai reconcile"):
        reply = await ask(bob, bob_dm, command, "for admins only", bot)
        assert "Reconciliation" not in reply

    # alice's conversation is untouched and still answered once per message.
    assert await answer_of(alice, room, bot, "still mine?") == "echo: still mine?"
    notes = await ask(alice, alice_dm, "!ai memory", "shared notes", bot)
    assert "alice's secret note" in notes and "bob's note" not in notes
    assert alice_space not in rooms
    assert await answer_of(bob, bob_room, bot, "mine") == "echo: mine"


async def test_blocked_user_gets_one_refusal_and_nothing_else(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    admin = await make_user()
    bot = bot_factory({**FAST_STREAM, "access": {"admins": [admin.user_id]}})
    alice = await make_user()
    dm, _space, room = await onboard(alice, bot)
    admin_dm = await admin.open_dm(bot.user_id)
    await admin.wait_for_notice(admin_dm, "Hi!", sender=bot.user_id, timeout=15)
    await ask(admin, admin_dm, f"!ai admin block {alice.user_id}", "now blocked", bot)

    first = await alice.send_text(room, "please answer")
    await alice.send_text(room, "please answer again")
    refusal = "Sorry, you may no longer use this bot; ask an admin."
    await alice.wait_for_notice(room, refusal, bot.user_id, 15, after=first)
    start = await alice.send_text(dm, "!ai start")
    await alice.wait_for_notice(dm, "Sorry, you are blocked", bot.user_id, 15, after=start)
    invites_before = set(alice.invites)

    # A restart (catch-up) does not answer what a blocked user sent.
    bot.kill()
    await alice.send_text(room, "while you were down")
    bot.start()

    await ask(admin, admin_dm, f"!ai admin unblock {alice.user_id}", "now unblocked", bot)
    # Answers go in order per room: once "back again" is answered, anything the bot would have
    # said to the earlier messages (before or after the restart) would be there already.
    assert await answer_of(alice, room, bot, "back again") == "echo: back again"
    texts = [alice.latest_text(room, e) for e in alice.messages(room, bot.user_id, after=first)]
    # One refusal for the two messages, one more for the message caught up after the restart
    # (the once-per-window memory does not survive a restart), never an answer.
    assert texts == [refusal, refusal, "echo: back again"], texts
    texts = await bot_texts_until(alice, dm, bot, start, "!ai rooms", "working rooms")
    assert len(texts) == 2 and texts[0] == "Sorry, you are blocked from using this bot.", texts
    assert set(alice.invites) == invites_before  # no Space or room was made while blocked


# Secrets of the other providers and of an MCP server (each distinctive, so a leak is found).
ANTHROPIC_KEY = "sk-ant-surfaces-K3Y-d0-not-leak"
RESPONSES_KEY = "sk-resp-surfaces-K3Y-d0-not-leak"
RESPONSES_WRONG_KEY = "sk-resp-wrong-K3Y-d0-not-leak"
MCP_TOKEN = "mcp-surfaces-T0KEN-d0-not-leak"
MCP_WRONG_TOKEN = "mcp-wrong-T0KEN-d0-not-leak"


def secrets_config(
    openai_url: str, anthropic_url: str, responses_url: str, mcp_url: str
) -> dict[str, Any]:
    """`gpt` (chat completions) and `claude` (Anthropic) hold keys their servers refuse;
    `platform` (Responses, server state) holds the right key, `platform-bad` a refused one; the
    MCP server `clock` gets the right token, `locked` a refused one."""
    config = fake_backend_config(openai_url)
    agent = {k: v for k, v in config["agents"][1].items() if k not in ("id", "backend", "name")}
    responses = {"type": "openai", "api": "responses", "state": "server", "base_url": responses_url}
    config["backends"] += [
        {
            "id": "anthropic",
            "type": "anthropic",
            "base_url": anthropic_url,
            "api_key": ANTHROPIC_KEY,
            "max_retries": 0,
        },
        {"id": "platform", **responses, "api_key": RESPONSES_KEY, "max_retries": 0},
        {"id": "platform-bad", **responses, "api_key": RESPONSES_WRONG_KEY, "max_retries": 0},
    ]
    config["agents"][1]["tools"] = ["clock", "locked"]
    config["agents"] += [
        {**agent, "id": "claude", "name": "Claude", "backend": "anthropic"},
        {**agent, "id": "platform", "name": "Platform", "backend": "platform"},
        {**agent, "id": "platform-bad", "name": "Platform (bad key)", "backend": "platform-bad"},
    ]
    config["mcp_servers"] = [
        {
            "id": "clock",
            "url": mcp_url,
            "allow": ["now", "add"],
            "headers": {"Authorization": f"Bearer {MCP_TOKEN}"},
        },
        {
            "id": "locked",
            "url": mcp_url,
            "allow": ["now"],
            "headers": {"Authorization": f"Bearer {MCP_WRONG_TOKEN}"},
        },
    ]
    return config


async def test_secrets_never_reach_logs_or_rooms(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """Providers reject keys and echo them back in their errors (as real ones do), an MCP server
    refuses a token and echoes it: no API key, MCP header value or the bot's access token shows
    up in the bot's logs, in any room or in room state; working keys and tokens neither."""
    admin = await make_user()
    secrets = (
        API_KEY,
        ANTHROPIC_KEY,
        RESPONSES_KEY,
        RESPONSES_WRONG_KEY,
        MCP_TOKEN,
        MCP_WRONG_TOKEN,
    )
    async with (
        FakeOpenAI(require_key="sk-the-right-one") as openai,
        FakeAnthropic(require_key="sk-ant-the-right-one") as anthropic,
        FakeResponses(require_key=RESPONSES_KEY) as platform,
    ):
        with McpTestServer(token=MCP_TOKEN) as mcp:
            config = secrets_config(openai.base_url, anthropic.base_url, platform.base_url, mcp.url)
            config["access"] = {"admins": [admin.user_id]}
            bot = bot_factory(config)
            dm, _space, room = await onboard(admin, bot)
            sent = await admin.send_text(room, "hello")
            notice = await admin.wait_for_notice(room, "API key", bot.user_id, 15, after=sent)
            assert "`gpt`" in admin.latest_text(room, notice)
            assert any(API_KEY in str(r["authorization"]) for r in openai.requests)  # really sent
            # One MCP server lists its tools with the right token; the other one refuses its own.
            tools = await ask(admin, room, "!ai tools", "Tools of `gpt`", bot)
            assert "`now` (clock)" in tools and "`add` (clock)" in tools, tools
            assert "`locked` failed: refused our credentials (HTTP 401)" in tools, tools

            await ask(admin, room, "!ai agent claude", "now talks to `claude`", bot)
            sent = await admin.send_text(room, "hello claude")
            notice = await admin.wait_for_notice(room, "`claude`", bot.user_id, 15, after=sent)
            assert "API key" in admin.latest_text(room, notice)
            assert any(r["headers"].get("x-api-key") == ANTHROPIC_KEY for r in anthropic.requests)

            # A platform that refuses the key creates no conversation, so no room…
            refused = await ask(
                admin, dm, "!ai new platform-bad Refused", "did not create a new conversation", bot
            )
            assert "HTTP 401" in refused, refused
            assert any(RESPONSES_WRONG_KEY in str(r["authorization"]) for r in platform.requests)
            # …and with the right key it keeps the new room's conversation.
            await ask(admin, dm, "!ai new platform Kept", "New working room", bot)
            kept = await admin.wait_for_invite(
                lambda _, st: create_content(st).get("org.surfaces.kind") == "working"
            )
            await admin.join(kept)
            assert await answer_of(admin, kept, bot, "hi platform") == (
                "Fake model says: hi platform"
            )

            await ask(admin, dm, "!ai status", "Surfaces status", bot)
            await ask(admin, dm, "!ai agents", "Agents", bot)
            await ask(admin, dm, "!ai reconcile", "Reconciliation", bot)
            await asyncio.to_thread(bot.restart)
            await ask(admin, dm, "!ai status", "Surfaces status", bot)

    # The operator sees which agent failed where and why, with the key masked…
    log = bot.log_text()
    assert f"Agent gpt failed in {room}: auth: Incorrect API key provided: ***" in log, log
    assert "Leaving out the tools of MCP server locked" in log, log
    outputs = {path.name: path.read_text(errors="replace") for path in bot.data_dir.glob("*.log")}
    assert {bot.log_path.name, "stdout.log"} <= set(outputs), sorted(outputs)
    for name, output in outputs.items():  # …and no secret is in any log or stdout/stderr
        for secret in (*secrets, bot.access_token):
            assert secret not in output, (name, secret)
    view = BotView(synapse, bot)
    for room_id in await view.joined_rooms():
        everything = json.dumps(await view.timeline(room_id)) + json.dumps(
            await view.state(room_id)
        )
        for secret in (*secrets, bot.access_token):
            assert secret not in everything, (room_id, secret)
    assert check_answers(await view.timeline(room), admin.user_id, bot.user_id).twice == []
    assert not [e for e in admin.messages(room, bot.user_id) if is_message(e, msgtype="m.text")]
