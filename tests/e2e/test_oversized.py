"""Sends that pass Matrix's 64 KiB event limit, on a real Synapse: long answers and replies
arrive whole, split over several messages, and no answer is left looking unfinished."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devtools.e2e import MakeUser
from devtools.matrix_user import MatrixUser, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from surfaces_plugin import layout
from surfaces_plugin.memory import MAX_NOTE_CHARS, MAX_NOTES
from tests.e2e.conftest import PLUGIN_DIR, watched
from tests.e2e.test_spaces import onboard

pytestmark = pytest.mark.e2e

# 7,920 characters (within max_message_chars) in 80 words: about 23 KB of UTF-8, so one
# streaming edit of the whole echo (text and HTML, twice) would be over 90 KB.
HANGUL = ("가나다라마바사아자차카타파하" * 7 + " ") * 80


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    data_dir = tmp_path_factory.mktemp("oversized-bot")
    with StandaloneBot(synapse, None, data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


def latest_content(user: MatrixUser, room_id: str, event: dict[str, Any]) -> dict[str, Any]:
    edits = user.edits(room_id, event)
    return edits[-1]["content"]["m.new_content"] if edits else event["content"]


async def test_a_long_non_ascii_answer_arrives_whole_and_finished(
    bot: StandaloneBot, make_user: MakeUser
) -> None:
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)
    sent = await alice.send_text(room, HANGUL)
    expected = f"echo: {HANGUL}".strip()

    def complete() -> list[dict[str, Any]] | None:
        parts = [latest_content(alice, room, e) for e in alice.messages(room, bot.user_id, sent)]
        if "".join(str(p.get("body", "")) for p in parts) != expected:
            return None
        if any(p[layout.TURN_KEY].get("partial") for p in parts):
            return None  # the last edit that clears the marker has not arrived yet
        return parts

    parts = await alice.wait_until(complete, timeout=60, what="the whole answer")
    assert len(parts) > 1  # it could not fit in one event
    assert all(p[layout.TURN_KEY]["answers"] == sent for p in parts)
    assert [bool(p[layout.TURN_KEY].get("continues")) for p in parts] == [False] + [True] * (
        len(parts) - 1
    )
    # The room goes on afterwards (compacting first: that answer filled the context budget).
    asked = await alice.send_text(room, "and now?")
    answer = await alice.wait_for(
        room, lambda e: is_message(e, bot.user_id) and layout.TURN_KEY in e["content"], 60, asked
    )
    assert await alice.wait_for_text(room, answer["event_id"], lambda t: t == "echo: and now?")


async def test_every_accepted_note_can_be_listed(bot: StandaloneBot, make_user: MakeUser) -> None:
    alice = await make_user()
    dm, _space, _room = await onboard(alice, bot)
    for i in range(MAX_NOTES):
        note = f"{i} " + "😀" * (MAX_NOTE_CHARS - 3)
        [reply] = await alice.command(dm, f"!ai memory add {note}", bot.user_id, quiet=0.2)
        assert reply.startswith(f"Noted as {i + 1}.")
    listing = await alice.command(dm, "!ai memory", bot.user_id, timeout=30, quiet=1.0)
    assert len(listing) > 1  # about 80 KB of text: several notices
    text = "".join(listing)
    assert text.startswith(f"**Your shared notes** ({MAX_NOTES}")
    assert all(f"\n{i + 1}. {i} 😀" in text for i in range(MAX_NOTES))
