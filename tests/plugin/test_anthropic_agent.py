"""A working room whose agent runs on the Anthropic backend, against a local Messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from devtools.fake_anthropic import FakeAnthropic

ALICE = "@alice:localhost"
KEY = "sk-ant-api03-plugin-SECRET-0123456789"


@pytest_asyncio.fixture
async def claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(require_key=KEY) as server:
        yield server


async def onboarded(make_surfaces: Any, fake: FakeAnthropic) -> tuple[Any, str]:
    h = await make_surfaces(
        streaming={"edit_interval_ms": 0},
        backends=[
            {"id": "echo", "type": "echo"},
            {"id": "anthropic", "type": "anthropic", "base_url": fake.base_url, "api_key": KEY},
        ],
        agents=[
            {
                "id": "claude",
                "name": "Claude",
                "description": "Anthropic's model",
                "backend": "anthropic",
                "model": "claude-test",
                "system_prompt": "You are Claude, in a Matrix room.",
            }
        ],
        default_agent="claude",
    )
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, room.room_id


async def test_a_room_on_an_anthropic_agent_answers_and_retries(make_surfaces, claude) -> None:
    h, room = await onboarded(make_surfaces, claude)
    await h.say(room, ALICE, "What is the capital of Peru?")
    assert h.client.bodies(room) == ["Fake Claude says: What is the capital of Peru?"]
    [sent] = claude.bodies
    assert sent["model"] == "claude-test" and sent["max_tokens"] == 4096
    assert sent["system"] == "You are Claude, in a Matrix room."
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of Peru?"}]}
    ]

    await h.say(room, ALICE, "!ai retry")
    assert h.client.bodies(room)[-1] == "Fake Claude says: What is the capital of Peru?"
    assert len(h.client.bodies(room)) == 2
    assert claude.bodies[1]["messages"] == sent["messages"]  # the same question asked again

    await h.say(room, ALICE, "And of Chile?")
    turns = claude.bodies[-1]["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]  # the API's alternation
    assert turns[-1]["content"] == [{"type": "text", "text": "And of Chile?"}]


async def test_an_overloaded_provider_is_retried_and_a_refusal_is_one_clear_notice(
    make_surfaces, claude
) -> None:
    h, room = await onboarded(make_surfaces, claude)
    claude.set_mode("overloaded", times=1)
    await h.say(room, ALICE, "hello")
    assert h.client.bodies(room) == ["Fake Claude says: hello"]
    claude.set_mode("status", status=400, message="prompt is too long: 210000 tokens")
    await h.say(room, ALICE, "more")
    notice = h.last_reply(room)
    assert notice.startswith("The agent `claude` rejected the request (HTTP 400)")
    assert "prompt is too long" in notice and KEY not in notice
