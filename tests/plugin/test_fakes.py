"""The fake Matrix client refuses what Synapse refuses, so plugin tests cannot pass on leniency."""

from __future__ import annotations

import pytest
from mautrix.errors import MForbidden, MInvalidParam

from surfaces_plugin import layout

from .fakes import FakeClient

ALICE = "@alice:localhost"


async def our_room(client: FakeClient, version: str) -> str:
    bot = str(client.mxid)
    return await client.create_room(
        room_version=version, power_level_override=layout.power_levels(bot, version)
    )


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_the_bot_sends_state_its_power_allows_and_is_refused_the_rest(version: str) -> None:
    client = FakeClient(room_version=version)
    room = await our_room(client, version)
    await client.send_state_event(room, layout.BINDING_TYPE, {"x": 1})  # the bot runs its rooms
    pl = dict(client.rooms[room].state[("m.room.power_levels", "")][1])
    if version == "12":  # the creator has infinite power and is not listed: only demote by
        assert str(client.mxid) not in pl["users"]  # creating the room with someone else
        client.rooms[room].state[("m.room.create", "")] = (ALICE, {"room_version": "12"})
    pl["users"] = {str(client.mxid): 10}
    client.rooms[room].state[("m.room.power_levels", "")] = (ALICE, pl)
    with pytest.raises(MForbidden):
        await client.send_state_event(room, layout.BINDING_TYPE, {"x": 2})
    assert client.rooms[room].state[(layout.BINDING_TYPE, "")][1] == {"x": 1}
    await client.send_message_event(room, "m.room.message", {"msgtype": "m.text", "body": "hi"})


async def test_a_v12_creator_cannot_be_listed_in_users() -> None:
    client = FakeClient(room_version="12")
    with pytest.raises(MInvalidParam):
        await client.create_room(power_level_override={"users": {str(client.mxid): 100}})


async def test_a_room_someone_else_made_refuses_the_bots_state_but_takes_its_messages() -> None:
    client = FakeClient()
    dm = client.add_room(ALICE, {ALICE: "join", str(client.mxid): "join"})
    with pytest.raises(MForbidden):
        await client.send_state_event(dm, "m.room.topic", {"topic": "mine"})
    await client.send_message_event(dm, "m.room.message", {"msgtype": "m.text", "body": "hi"})


async def test_no_sends_after_the_bot_left_or_was_kicked() -> None:
    client = FakeClient()
    left = await our_room(client, "12")
    kicked = await our_room(client, "12")
    await client.leave_room(left)
    client.kick(kicked, str(client.mxid), by=ALICE)
    for room in (left, kicked):
        with pytest.raises(MForbidden):
            await client.send_message_event(room, "m.room.message", {"msgtype": "m.text", "body": "x"})
        with pytest.raises(MForbidden):
            await client.send_state_event(room, layout.BINDING_TYPE, {"x": 1})
        with pytest.raises(MForbidden):
            await client.invite_user(room, ALICE)
        with pytest.raises(MForbidden):  # private rooms: no way back in without an invite
            await client.join_room(room)
    assert client.messages(left) == [] and client.messages(kicked) == []


async def test_event_ids_are_unique_and_state_events_are_in_the_timeline() -> None:
    client = FakeClient()
    rooms = [await our_room(client, "12") for _ in range(2)]
    rooms.append(client.add_room(ALICE, {ALICE: "join", str(client.mxid): "join"}))
    for room in rooms:
        await client.send_message_event(room, "m.room.message", {"body": "a"})
        await client.send_state_event(rooms[0], layout.BINDING_TYPE, {"x": room})
        client.user_message(room, ALICE, "b")
    timeline = {r: [e["event_id"] for e in client.rooms[r].timeline] for r in rooms}
    state = {r: [e["event_id"] for e in await client.api.request("GET", f"/rooms/{r}/state")]
             for r in rooms}
    in_timelines = [i for ids in timeline.values() for i in ids]
    assert len(in_timelines) == len(set(in_timelines))
    in_state = [i for ids in state.values() for i in ids]
    assert len(in_state) == len(set(in_state))
    for room in rooms:  # a room's state events are never another room's events
        assert not set(state[room]) & (set(in_timelines) - set(timeline[room]))
    for room in rooms[:2]:  # what the bot made: each current state event is one in the timeline
        assert set(state[room]) <= set(timeline[room])


async def test_messages_follow_dir_limit_and_tokens() -> None:
    client = FakeClient()
    room = client.add_room(ALICE, {ALICE: "join", str(client.mxid): "join"})
    sent = [client.user_message(room, ALICE, str(i)).event_id for i in range(5)]
    everything = [e["event_id"] for e in client.rooms[room].timeline]  # create, levels, 0..4

    async def page(**query: str) -> dict:
        return await client.api.request("GET", f"/rooms/{room}/messages", query_params=query)

    back = await page(dir="b", limit="2")
    assert [e["event_id"] for e in back["chunk"]] == [sent[4], sent[3]]
    back2 = await page(dir="b", limit="2", **{"from": back["end"]})
    assert [e["event_id"] for e in back2["chunk"]] == [sent[2], sent[1]]
    rest = await page(dir="b", limit="10", **{"from": back2["end"]})
    assert [e["event_id"] for e in rest["chunk"]] == list(reversed(everything[:3]))
    assert "end" not in rest  # the start of the room: nothing further back

    forward = await page(dir="f", limit="3")
    assert [e["event_id"] for e in forward["chunk"]] == everything[:3]
    forward2 = await page(dir="f", **{"from": forward["end"]})  # default limit 10
    assert [e["event_id"] for e in forward2["chunk"]] == everything[3:]
    assert "end" not in forward2
    newer = client.user_message(room, ALICE, "later").event_id  # a token stays a position
    again = await page(dir="f", **{"from": forward["end"]})
    assert [e["event_id"] for e in again["chunk"]] == everything[3:] + [newer]
    with pytest.raises(MInvalidParam):
        await page(limit="2")  # dir is required
