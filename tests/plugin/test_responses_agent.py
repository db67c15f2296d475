"""A working room whose agent is on the Responses API (replay), against a real local server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from devtools.fake_responses import FakeResponses

ALICE = "@alice:localhost"
KEY = "sk-plugin-test-0123456789"


@pytest_asyncio.fixture
async def platform() -> AsyncIterator[FakeResponses]:
    async with FakeResponses(require_key=KEY) as server:
        yield server


async def test_a_working_room_answers_through_a_replayed_responses_agent(
    make_surfaces, platform
) -> None:
    h = await make_surfaces(
        backends=[
            {"id": "echo", "type": "echo"},
            {
                "id": "platform",
                "type": "openai",
                "api": "responses",
                "state": "replay",
                "base_url": platform.base_url,
                "api_key": KEY,
                "max_retries": 0,
            },
        ],
        agents=[
            {"id": "echo", "name": "Echo", "description": "Repeats you", "backend": "echo"},
            {
                "id": "gpt",
                "name": "GPT",
                "description": "On the Responses API",
                "backend": "platform",
                "model": "gpt-test",
                "system_prompt": "Answer in one line.",
            },
        ],
        default_agent="gpt",
        streaming={"edit_interval_ms": 0},
    )
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "What is the capital of France?")
    assert h.last_reply(room.room_id) == "Fake model says: What is the capital of France?"
    await h.say(room.room_id, ALICE, "And of Spain?")
    assert h.last_reply(room.room_id) == "Fake model says: And of Spain?"

    first, second = platform.bodies
    assert first["model"] == "gpt-test" and first["store"] is False
    assert "Answer in one line." in first["instructions"]
    # Replay: the second request carries the whole conversation so far, the answer included.
    assert second["input"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Fake model says: What is the capital of France?"},
        {"role": "user", "content": "And of Spain?"},
    ]
    assert platform.conversations == {}  # nothing was kept on the platform
    assert all(KEY not in body for body in h.client.bodies(room.room_id))
