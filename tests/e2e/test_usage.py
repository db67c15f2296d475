"""Usage and quotas on a real Synapse: `!ai usage` shows exactly the usage the OpenAI-compatible
server reported in its streams, and a user over quota is refused once, told when it resets,
and nothing more reaches the agent.

The bot runs in its own process; the fake server runs in a thread of the test (`Threaded`)
and keeps each `usage` it sent (`FakeOpenAI.reported`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import Event, MatrixUser, create_content, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from devtools.threaded import Threaded
from surfaces_plugin import layout
from tests.e2e.conftest import PLUGIN_DIR, watched

pytestmark = pytest.mark.e2e

CAPPED_QUOTA = 20  # tokens a day with `capped`: one answer goes over it


def bot_config(fake: FakeOpenAI) -> dict[str, Any]:
    agent = {"backend": "fake", "model": "fake-model", "system_prompt": "Be brief."}
    return {
        "backends": [
            {"id": "fake", "type": "openai", "base_url": fake.base_url, "max_retries": 0}
        ],
        "agents": [
            {"id": "gpt", "name": "GPT", "description": "no quota", **agent},
            {
                "id": "capped",
                "name": "Capped",
                "description": "a small quota",
                "daily_tokens_per_user": CAPPED_QUOTA,
                **agent,
            },
        ],
        "default_agent": "gpt",
        "streaming": {"enabled": True, "edit_interval_ms": 100},
        "limits": {"per_user_requests_per_minute": 1000},
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with Threaded(lambda: FakeOpenAI(), name="fake-openai") as threaded:
        yield threaded.server


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    data_dir = tmp_path_factory.mktemp("usage-bot")
    with StandaloneBot(synapse, bot_config(fake), data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


async def onboard(bot: StandaloneBot, make_user: MakeUser) -> tuple[MatrixUser, str]:
    alice = await make_user()
    dm = await alice.open_dm(bot.user_id)
    asked = await alice.send_text(dm, "!ai start")
    await alice.wait_for_notice(dm, "Space is ready", sender=bot.user_id, after=asked, timeout=30)
    space = await alice.wait_for_invite(lambda _, st: create_content(st).get("type") == "m.space")
    room = await alice.wait_for_invite(
        lambda _, st: create_content(st).get(layout.KIND_KEY) == "working"
    )
    await alice.join(space)
    await alice.join(room)
    await alice.wait_until(lambda: room in alice.joined, what="joined the working room")
    return alice, room


async def answered(alice: MatrixUser, bot: StandaloneBot, room: str, text: str) -> Event:
    """Send `text` and wait for its answer's final version (no `partial` left)."""
    sent = await alice.send_text(room, text)
    answer = await alice.wait_for(
        room,
        lambda e: is_message(e, bot.user_id) and layout.TURN_KEY in e["content"],
        timeout=20,
        after=sent,
    )

    def final() -> bool:
        edits = alice.edits(room, answer)
        content = edits[-1]["content"]["m.new_content"] if edits else answer["content"]
        return not content[layout.TURN_KEY].get("partial")

    await alice.wait_until(final, timeout=15, what="the final version of the answer")
    return answer


def figure(prompt: int, completion: int) -> str:
    return f"{prompt + completion:,} tokens ({prompt:,} prompt + {completion:,} completion)"


async def test_usage_equals_what_the_server_reported(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    alice, room = await onboard(bot, make_user)
    mark = len(fake.reported)
    answers = [
        await answered(alice, bot, room, text)
        for text in ("What is the tallest mountain?", "And the longest river on Earth?")
    ]
    reported = fake.reported[mark:]
    assert len(reported) == 2
    # Each answer's final version carries its usage, so a lost ledger can be rebuilt from it.
    for answer, usage in zip(answers, reported, strict=True):
        edits = alice.edits(room, answer)
        final = edits[-1]["content"]["m.new_content"] if edits else answer["content"]
        assert final[layout.TURN_KEY]["usage"] == {
            "prompt": usage["prompt_tokens"],
            "completion": usage["completion_tokens"],
            "estimated": False,
        }
    shown = figure(
        sum(u["prompt_tokens"] for u in reported), sum(u["completion_tokens"] for u in reported)
    )
    [reply] = await alice.command(room, "!ai usage", bot.user_id)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"- today ({today}): {shown}" in reply
    assert f"- `gpt`: {shown}" in reply
    assert "≈" not in reply


async def test_over_quota_is_refused_once_with_the_reset_time(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    alice, room = await onboard(bot, make_user)
    [switched] = await alice.command(room, "!ai agent capped", bot.user_id)
    assert "now talks to `capped`" in switched
    await answered(alice, bot, room, "Tell me about the tallest mountain on Earth.")
    asked = len(fake.bodies)

    sent = await alice.send_text(room, "One more question, please.")
    notice = await alice.wait_for_notice(room, "daily quota", bot.user_id, timeout=15, after=sent)
    text = alice.latest_text(room, notice)
    assert f"daily quota of {CAPPED_QUOTA} tokens with `capped`" in text
    found = re.search(r"resets at 00:00 UTC, in (?:(\d+) h )?(\d+) min", text)
    assert found, text
    left_s = int(found.group(1) or 0) * 3600 + int(found.group(2)) * 60
    until_midnight = 86_400 - time.time() % 86_400
    assert until_midnight - 120 <= left_s <= until_midnight

    await alice.send_text(room, "And another one?")
    [usage] = await alice.command(room, "!ai usage", bot.user_id)  # the signal after silence
    assert f"- daily quota with `capped`: {CAPPED_QUOTA} tokens, 0 left today" in usage
    notices = [
        e for e in alice.messages(room, bot.user_id) if "daily quota of" in e["content"]["body"]
    ]
    assert len(notices) == 1
    assert len(fake.bodies) == asked  # neither refused message reached the agent
