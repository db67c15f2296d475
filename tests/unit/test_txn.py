"""Transaction ids of sends tied to a user event: deterministic, distinct, URL-safe, short."""

from __future__ import annotations

import re

from surfaces_plugin.jobs import Job
from surfaces_plugin.txn import content_label, part, txn_id

URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")  # RFC 3986 unreserved: no escaping in the path


def test_same_event_part_and_attempt_give_the_same_id() -> None:
    assert txn_id("$a:hs", "post 0") == txn_id("$a:hs", "post 0")
    assert txn_id("$a:hs", "post 0", "$retry") == txn_id("$a:hs", "post 0", "$retry")


def test_ids_differ_per_event_part_and_attempt() -> None:
    ids = {
        txn_id("$a:hs", "post 0"),
        txn_id("$b:hs", "post 0"),
        txn_id("$a:hs", "post 1"),
        txn_id("$a:hs", "edit $x 1"),
        txn_id("$a:hs", "edit $x 2"),
        txn_id("$a:hs", "refusal"),
        txn_id("$a:hs", "post 0", "$retry1"),
        txn_id("$a:hs", "post 0", "$retry2"),
    }
    assert len(ids) == 8


def test_fields_cannot_run_into_each_other() -> None:
    assert txn_id("$a", "b c") != txn_id("$a b", "c")
    assert txn_id("$a", "post 0", "x") != txn_id("$ax", "post 0")


def test_ids_are_url_safe_and_short_whatever_the_input() -> None:
    for event_id, label in [
        ("$abc/def+ghi=:example.org", "post 0"),
        ("$" + "x" * 5000, "final " + "é" * 300),
        ("$\ud800lone", "compacting / ? # %"),
    ]:
        value = txn_id(event_id, label, "$cmd/+=")
        assert URL_SAFE.match(value), value
        assert len(value) <= 32


def test_parts_of_a_split_notice_have_their_own_ids() -> None:
    base = txn_id("$a:hs", "refusal")
    assert part(base, 0) == base
    assert len({part(base, i) for i in range(4)}) == 4
    assert all(URL_SAFE.match(part(base, i) or "") for i in range(4))
    assert part(None, 3) is None  # not tied to a user event: mautrix picks a random id


def test_content_label_follows_the_content_not_key_order() -> None:
    assert content_label({"a": 1, "b": "x"}) == content_label({"b": "x", "a": 1})
    assert content_label({"body": "done"}) != content_label({"body": "done."})


def test_a_job_keys_its_sends_by_its_event_and_attempt() -> None:
    first = Job("!r", "$m", "@u:hs", "hi", 1)
    again = Job("!r", "$m", "@u:hs", "hi", 1)
    retry = Job("!r", "$m", "@u:hs", "hi", 1, retry=True, attempt="$retry-cmd")
    assert first.txn("post 0") == again.txn("post 0")
    assert retry.txn("post 0") != first.txn("post 0")
    assert Job("!r", "", "@u:hs", "hi", 1).txn("post 0") is None


def test_a_regeneration_keys_its_sends_by_the_edit_or_reaction_that_asked() -> None:
    first = Job("!r", "$msg", "@a:hs", "old text", 1)
    by_edit = Job("!r", "$msg", "@a:hs", "new text", 2, regenerate="$edit1", edited=True)
    again = Job("!r", "$msg", "@a:hs", "new text", 2, regenerate="$edit1", edited=True)
    by_next_edit = Job("!r", "$msg", "@a:hs", "newer", 3, regenerate="$edit2", edited=True)
    # The same edit answered again after a crash reuses its events; another edit does not.
    assert by_edit.txn("edit $ans 1") == again.txn("edit $ans 1")
    assert len({j.txn("edit $ans 1") for j in (first, by_edit, by_next_edit)}) == 3
    assert by_edit.key == "$edit1" and first.key == "$msg"
