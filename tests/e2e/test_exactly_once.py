"""Exactly-once down to the send, on a real Synapse (issue 16, item 7).

The bot sends an answer with a transaction id derived from the user's message. If it crashed
after Synapse accepted that send but before recording it, its resend carries the same id: the
test replays exactly that request with the bot's own access token (same user, same device) and
Synapse answers with the first event's id, adding nothing to the room. The user sees one
answer. Another attempt (a `!ai retry`, keyed by the command's id) is a new event.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.matrix_user import is_message
from devtools.maubot_standalone import StandaloneBot
from surfaces_plugin.txn import txn_id

from .invariants import TURN, onboard

pytestmark = pytest.mark.e2e


@pytest.fixture
def bot(bot_factory: BotFactory) -> StandaloneBot:
    return bot_factory({"streaming": {"enabled": False}})  # one send per answer: "post 0"


async def send_as_bot(bot: StandaloneBot, room_id: str, txn: str, content: dict[str, Any]) -> str:
    path = (
        f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id, safe='')}"
        f"/send/m.room.message/{txn}"
    )
    status, body = await asyncio.to_thread(
        bot.synapse.request, "PUT", path, content, token=bot.access_token
    )
    assert status == 200, body
    return str(body["event_id"])


async def test_a_resent_answer_is_one_event(bot: StandaloneBot, make_user: MakeUser) -> None:
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)

    sent = await alice.send_text(room, "hello agent")
    answer = await alice.wait_for(
        room,
        lambda e: is_message(e, bot.user_id, "m.text")
        and e["content"].get(TURN, {}).get("answers") == sent,
        timeout=20,
    )

    # The bot's resend after a crash: same request, same txn id, same device.
    resent = await send_as_bot(bot, room, txn_id(sent, "post 0"), answer["content"])
    assert resent == answer["event_id"]

    # A new attempt has another txn id: Synapse dedups by txn id, not by content.
    again = await send_as_bot(bot, room, txn_id(sent, "post 0", "$retry"), answer["content"])
    assert again != answer["event_id"]

    # What the user observes: the first answer once, then the other attempt, nothing else.
    await alice.wait_for(room, lambda e: e.get("event_id") == again, timeout=10)
    answers = [
        e["event_id"]
        for e in alice.messages(room, bot.user_id)
        if e["content"].get(TURN, {}).get("answers") == sent
    ]
    assert answers == [answer["event_id"], again]
