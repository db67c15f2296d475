"""Streaming on a real Synapse, from a local OpenAI-compatible server streaming at a model's pace:
the MSC4357 live marker while an answer is written and not on its final text, a first post that
ends a sentence, a long answer continued in new messages, and `!ai stream off`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import Event, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from devtools.threaded import Threaded
from surfaces_plugin import layout
from tests.e2e.conftest import PLUGIN_DIR, watched
from tests.e2e.test_context import Setup, finished, latest_content, onboard

pytestmark = pytest.mark.e2e

# Thirty words in four sentences: at 25 words a second it streams for about 1.2 s.
ANSWER = (
    "Three plus zero is three. To check, start at three and add nothing at all. "
    "You stay at three, so the sum does not change. Adding zero never changes a number."
)
# Too long for one edit (an edit carries the text twice, as Markdown and HTML): 9,000 Hangul
# characters are about 108 KB in an edit.
LONG_ANSWER = ("가나다라마바사아자차카타파하" * 6 + ". ") * 100


@pytest.fixture(scope="module")
def fake() -> Iterator[Threaded[FakeOpenAI]]:
    with Threaded(lambda: FakeOpenAI(), name="fake-openai-streaming") as threaded:
        yield threaded


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, fake: Threaded[FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    config: dict[str, Any] = {
        "backends": [
            {"id": "fake", "type": "openai", "base_url": fake.server.base_url, "max_retries": 0}
        ],
        "agents": [{"id": "gpt", "name": "Fake", "backend": "fake", "model": "fake-model"}],
        "default_agent": "gpt",
        # The shipped rules at a third of their waits, so the test sees several edits quickly.
        "streaming": {
            "enabled": True,
            "first_post_ms": 300,
            "edit_interval_ms": 300,
            "max_edit_interval_ms": 1000,
        },
        "limits": {"per_user_requests_per_minute": 1000},
    }
    data_dir = tmp_path_factory.mktemp("streaming-bot")
    with StandaloneBot(synapse, config, data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


def answer_to(s: Setup, sent: str) -> Any:
    return lambda e: is_message(e, s.bot.user_id) and e["content"].get(layout.TURN_KEY, {}).get(
        "answers"
    ) == sent


async def ask(s: Setup, text: str) -> tuple[str, Event]:
    sent = await s.alice.send_text(s.room, text)
    return sent, await s.alice.wait_for(s.room, answer_to(s, sent), timeout=20, after=sent)


async def test_the_live_marker_is_on_the_post_and_edits_but_not_on_the_final_text(
    bot: StandaloneBot, make_user: MakeUser, fake: Threaded[FakeOpenAI]
) -> None:
    fake.call(lambda f: f.set_mode("normal", reply=ANSWER, first_delay_s=0.4, delay_s=0.04))
    s = await onboard(bot, make_user)
    _, post = await ask(s, "What is 3 plus 0?")
    assert await finished(s, post) == ANSWER
    content = post["content"]
    assert content["body"] == "Three plus zero is three."  # the first sentence, nothing cut
    assert content[layout.LIVE_KEY] == {} and content[layout.TURN_KEY]["partial"] is True
    edits = s.alice.edits(s.room, post)
    assert len(edits) >= 2, "expected an edit while streaming, then the final one"
    for edit in edits[:-1]:
        assert layout.LIVE_KEY in edit["content"]
        assert layout.LIVE_KEY in edit["content"]["m.new_content"]
        assert edit["content"]["m.new_content"]["body"].endswith(".")  # at a sentence end
    final = edits[-1]["content"]
    assert layout.LIVE_KEY not in final and layout.LIVE_KEY not in final["m.new_content"]
    assert "partial" not in final["m.new_content"][layout.TURN_KEY]


async def test_a_long_answer_continues_in_new_messages(
    bot: StandaloneBot, make_user: MakeUser, fake: Threaded[FakeOpenAI]
) -> None:
    fake.call(lambda f: f.set_mode("normal", reply=LONG_ANSWER, chunk_chars=300, delay_s=0.02))
    s = await onboard(bot, make_user)
    sent, first = await ask(s, "Say it all")

    def parts() -> list[Event]:
        return [e for e in s.alice._after(s.room, sent) if answer_to(s, sent)(e)]

    def whole() -> bool:
        texts = [s.alice.latest_text(s.room, p) for p in parts()]
        ended = all(
            "partial" not in latest_content(s.alice, s.room, p)[layout.TURN_KEY] for p in parts()
        )
        return ended and "".join(texts) == LONG_ANSWER.strip()

    await s.alice.wait_until(whole, timeout=60, what="the whole long answer, every part ended")
    found = parts()
    assert len(found) > 1 and found[0]["event_id"] == first["event_id"]
    for previous, part in zip(found, found[1:], strict=False):
        assert part["content"][layout.TURN_KEY]["continues"] == previous["event_id"]
    assert all(layout.LIVE_KEY not in latest_content(s.alice, s.room, p) for p in found)


async def test_stream_off_gives_one_message(
    bot: StandaloneBot, make_user: MakeUser, fake: Threaded[FakeOpenAI]
) -> None:
    fake.call(lambda f: f.set_mode("normal", reply=ANSWER, first_delay_s=0.4, delay_s=0.04))
    s = await onboard(bot, make_user)
    replies = await s.alice.command(s.room, "!ai stream off", s.bot.user_id, quiet=0.2)
    assert replies == ["Streaming is off here: each answer is sent once, whole."]
    _, answer = await ask(s, "What is 3 plus 0?")
    assert answer["content"]["body"] == ANSWER
    assert layout.LIVE_KEY not in answer["content"]
    assert "partial" not in answer["content"][layout.TURN_KEY]
    # The room answers in order: once the next answer is here, the first one is complete.
    await ask(s, "And 4 plus 0?")
    assert s.alice.edits(s.room, answer) == []
