"""Exactly-once down to the send: a resend of an answer's parts is one event (issue 16, item 7).

The fake client deduplicates transaction ids the way Synapse does (same txn id → the first
event id, nothing new in the room).
"""

from __future__ import annotations

from mautrix.errors import MatrixStandardRequestError

from surfaces_plugin.jobs import Job

from .test_dispatch import ALICE, onboarded


async def test_an_answer_sent_again_after_a_lost_mark_is_one_answer(make_surfaces) -> None:
    h, room_id, backend = await onboarded(make_surfaces)
    await h.say(room_id, ALICE, "tell me something")
    assert h.client.bodies(room_id) == ["re: tell me something"]
    sent = list(h.client.messages(room_id))
    assert len(sent) > 1  # posted, then edited: every send carried a txn id

    # A crash after the homeserver took the answer but before the plugin recorded it: the
    # same job is answered again (same event, same attempt), with the same agent output.
    room = h.app.rooms.room(room_id)
    assert room is not None
    last = await h.app.history.last_user_turn(room)
    assert last is not None and last.event_id
    h.app.dispatcher.enqueue(
        Job(room_id, last.event_id, ALICE, last.content, last.ts, retry=True, upto_seq=last.seq)
    )
    await h.settle()
    assert len(backend.requests) == 2  # the agent really answered twice
    assert h.client.bodies(room_id) == ["re: tell me something"]  # the user sees one
    assert h.client.messages(room_id) == sent  # not even an extra edit reached the room


async def test_a_retried_send_the_server_had_processed_is_one_event(make_surfaces) -> None:
    h, room_id, _ = await onboarded(make_surfaces, streaming={"enabled": False})
    h.app.io.gateway.base_delay_s = 0.01
    send = h.client.send_message_event
    lost = []

    async def response_lost(room, event_type, content, txn_id=None, **kwargs):
        event_id = await send(room, event_type, content, txn_id=txn_id, **kwargs)
        if not lost:  # the first send lands, but its response never reaches the bot
            lost.append(event_id)
            raise MatrixStandardRequestError(502, "bad gateway")
        return event_id

    h.client.send_message_event = response_lost  # type: ignore[method-assign]
    await h.say(room_id, ALICE, "hello")
    assert lost, "the send was not exercised"
    assert h.client.bodies(room_id) == ["re: hello"]
    assert [e["event_id"] for e in h.client.messages(room_id)] == lost  # the retry returned the first event


async def test_retry_is_a_new_answer_not_a_duplicate_of_the_first(make_surfaces) -> None:
    h, room_id, _ = await onboarded(make_surfaces)
    await h.say(room_id, ALICE, "question")
    await h.say(room_id, ALICE, "!ai retry")
    await h.say(room_id, ALICE, "!ai retry")
    assert h.client.bodies(room_id) == ["re: question"] * 3
