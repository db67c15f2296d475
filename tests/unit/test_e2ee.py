"""Reading encrypted history never raises, whatever a page holds (pure parts and `decrypt`)."""

from __future__ import annotations

from types import SimpleNamespace

from mautrix.errors import SessionNotFound

from surfaces_plugin import e2ee


class NoKeys:
    """A crypto machine that holds no Megolm session, as for a message whose key never came."""

    async def decrypt_megolm_event(self, evt):
        raise SessionNotFound(evt.content.session_id)


def _io():
    return SimpleNamespace(client=SimpleNamespace(crypto=NoKeys()), can_encrypt=True)


def _encrypted(content) -> dict:
    return {"type": "m.room.encrypted", "event_id": "$e", "sender": "@a:x",
            "origin_server_ts": 1, "content": content}


async def test_events_without_key_or_malformed_stay_encrypted_and_nothing_raises() -> None:
    good = _encrypted({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA", "session_id": "S"})
    hostile = [
        _encrypted({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": 5, "session_id": []}),
        _encrypted({"algorithm": "m.olm.v1.curve25519-aes-sha2", "ciphertext": {}}),
        _encrypted("not a mapping"),
        _encrypted({}),  # redacted
    ]
    plain = {"type": "m.room.message", "event_id": "$p", "sender": "@a:x", "content": {"body": "hi"}}
    page = [good, *hostile, plain]
    out = await e2ee.readable(_io(), "!r", page)
    assert out == page  # nothing decrypted, nothing dropped, order kept
    assert [e2ee.is_undecryptable(e) for e in out] == [True] * 5 + [False]
    assert e2ee.session_of(good) == "S" and e2ee.session_of(hostile[0]) == ""


def test_only_the_bots_own_notice_marks_a_session_as_told() -> None:
    notice = {"sender": "@bot:x", "content": {e2ee.UNDECRYPTABLE_KEY: {"session_id": "S"}}}
    assert e2ee.noticed_session(notice, "@bot:x") == "S"
    assert e2ee.noticed_session({**notice, "sender": "@mallory:x"}, "@bot:x") is None
    assert e2ee.noticed_session({"sender": "@bot:x", "content": {e2ee.UNDECRYPTABLE_KEY: 1}}, "@bot:x") is None
