"""Encryption as the owner sees it, at the plugin tier (real crypto runs in tests/e2e)."""

from __future__ import annotations

from types import SimpleNamespace

ALICE = "@alice:localhost"
ENCRYPTION = ("m.room.encryption", "")


def _can_encrypt(client) -> None:
    # What `MatrixIO.can_encrypt` looks at: maubot sets `client.crypto` when crypto is on.
    client.crypto = SimpleNamespace()


async def _start(h) -> str:
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return room.room_id


async def test_without_crypto_rooms_stay_plain_and_encrypt_is_refused(make_surfaces) -> None:
    h = await make_surfaces()
    room = await _start(h)
    assert ENCRYPTION not in h.client.rooms[room].state
    await h.say(room, ALICE, "!ai encrypt")
    assert "I cannot encrypt" in h.last_reply(room)
    assert ENCRYPTION not in h.client.rooms[room].state
    assert (await h.app.status_text()).count("encryption: off") == 1


async def test_with_crypto_new_working_rooms_are_created_encrypted(make_surfaces) -> None:
    from tests.plugin.fakes import FakeClient

    client = FakeClient()
    _can_encrypt(client)
    h = await make_surfaces(client)
    room = await _start(h)
    assert h.client.rooms[room].state[ENCRYPTION][1] == {"algorithm": "m.megolm.v1.aes-sha2"}
    await h.say(room, ALICE, "!ai encrypt")
    assert h.last_reply(room) == "This room is already end-to-end encrypted."


async def test_encryption_off_keeps_rooms_plain_even_when_the_bot_could_encrypt(make_surfaces) -> None:
    from tests.plugin.fakes import FakeClient

    client = FakeClient()
    _can_encrypt(client)
    h = await make_surfaces(client, spaces={"encryption": "off"})
    room = await _start(h)
    assert ENCRYPTION not in h.client.rooms[room].state
    await h.say(room, ALICE, "!ai encrypt")  # the owner may still choose it for one room
    assert "cannot be turned off again" in h.last_reply(room)
    assert h.client.rooms[room].state[ENCRYPTION][1]["algorithm"] == "m.megolm.v1.aes-sha2"
    await h.say(room, ALICE, "!ai encrypt")
    assert h.last_reply(room) == "This room is already end-to-end encrypted."
