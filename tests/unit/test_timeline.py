"""A conversation's history read back from the room timeline (pure)."""

from __future__ import annotations

from surfaces_plugin import layout, replies
from surfaces_plugin.timeline import history_from_timeline, scan_timeline, summary_notice_text

BOT = "@bot:x"
ALICE = "@alice:x"
BOB = "@bob:x"
CHAT = "echo-new"


class Timeline:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def add(self, sender: str, content: dict, type_: str = "m.room.message") -> str:
        event_id = f"$e{len(self.events)}"
        self.events.append(
            {"type": type_, "event_id": event_id, "sender": sender, "content": content,
             "origin_server_ts": 1000 + len(self.events)}
        )
        return event_id

    def user(self, body: str, sender: str = ALICE) -> str:
        return self.add(sender, {"msgtype": "m.text", "body": body})

    def answer(self, body: str, chat: str = CHAT) -> str:
        return self.add(BOT, replies.rendered(body, "m.text", layout.turn_marker(chat, "echo")))

    def edit(self, target: str, body: str) -> None:
        new = replies.rendered(body, "m.text", layout.turn_marker(CHAT, "echo"))
        self.add(BOT, replies.edit(target, new))

    def history(self):
        return history_from_timeline(
            list(reversed(self.events)), owner=ALICE, bot_id=BOT, platform_chat_id=CHAT,
            is_command=lambda body: body.startswith("!ai "),
        )


def test_turns_with_final_edits_back_to_the_reset_notice() -> None:
    t = Timeline()
    t.add("@bot:x", {}, "m.room.create")
    t.user("before the reset")
    t.answer("old answer", chat="echo-old")
    t.add(BOT, replies.notice("fresh start", layout.reset_marker(CHAT)))
    q = t.user("question")
    a = t.answer("ans")
    t.edit(a, "answer, half")
    t.edit(a, "answer, whole")
    t.user("!ai context")
    t.add(BOT, replies.notice("context report"))
    t.user("hi from bob", sender=BOB)
    t.user("follow-up")
    history = t.history()
    assert [(x.role, x.content) for x in history.turns] == [
        ("user", "question"),
        ("assistant", "answer, whole"),
        ("user", "follow-up"),
    ]
    assert history.turns[0].event_id == q and history.turns[1].event_id == a
    assert history.summary is None


def test_an_answer_for_another_chat_ends_the_conversation() -> None:
    t = Timeline()
    t.user("old question")
    t.answer("old answer", chat="echo-old")
    t.user("new question")
    assert [x.content for x in t.history().turns] == ["new question"]


def test_the_latest_summary_of_this_chat_is_found() -> None:
    t = Timeline()
    t.user("one")
    first = t.answer("re one")
    t.add(BOT, replies.notice(summary_notice_text("old summary", 2),
                              layout.summary_marker(CHAT, first)))
    t.user("two")
    second = t.answer("re two")
    t.add(BOT, replies.notice(summary_notice_text("They said one, then two.", 4),
                              layout.summary_marker(CHAT, second)))
    t.add(BOT, replies.notice(summary_notice_text("other", 1),
                              layout.summary_marker("other-chat", second)))
    history = t.history()
    assert history.summary == "They said one, then two."
    assert history.summary_upto_event_id == second
    assert len(history.turns) == 4


def test_catch_up_skips_commands_sent_while_the_bot_was_down() -> None:
    t = Timeline()
    t.user("question")
    t.answer("answer")
    t.user("!ai context")
    t.user("missed one")
    missed = scan_timeline(
        list(reversed(t.events)), ALICE, BOT, 0, lambda body: body.startswith("!ai ")
    ).missed
    assert [e["content"]["body"] for e in missed] == ["missed one"]


def test_a_redacted_message_and_its_answer_are_left_out_of_a_rebuild() -> None:
    t = Timeline()
    kept = t.user("keep this")
    t.add(BOT, replies.rendered("re: keep", "m.text", layout.turn_marker(CHAT, "echo", answers=kept)))
    gone = t.user("my password is hunter2")
    t.add(BOT, replies.rendered("re: hunter2", "m.text", layout.turn_marker(CHAT, "echo", answers=gone)))
    redacted = next(e for e in t.events if e["event_id"] == gone)
    redacted["content"] = {}  # what the homeserver serves once a message is redacted
    redacted["unsigned"] = {"redacted_because": {"type": "m.room.redaction", "sender": ALICE}}
    t.user("after")
    assert [(x.role, x.content) for x in t.history().turns] == [
        ("user", "keep this"),
        ("assistant", "re: keep"),
        ("user", "after"),
    ]


def test_catch_up_finds_a_compaction_notice_no_edit_ended() -> None:
    t = Timeline()
    t.user("first")
    t.answer("echo: first")
    done = t.add(BOT, replies.notice("Compacting…", layout.compacting_marker(CHAT)))
    t.add(BOT, replies.edit(done, replies.notice("Compacted.")))
    t.user("second")
    cut = t.add(BOT, replies.notice("Compacting…", layout.compacting_marker(CHAT)))
    scan = scan_timeline(list(reversed(t.events)), ALICE, BOT, 0)
    assert scan.unfinished_compactions == (cut,)
    assert [e["content"]["body"] for e in scan.missed] == ["second"]


def test_catch_up_reports_owner_messages_it_cannot_decrypt_and_sessions_already_told() -> None:
    t = Timeline()
    t.user("question")
    t.answer("answer")
    sealed = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA", "session_id": "S1"}
    first = t.add(ALICE, sealed, "m.room.encrypted")
    t.add(BOB, {**sealed, "session_id": "S9"}, "m.room.encrypted")  # not the owner: not ours
    t.add(BOT, replies.notice("cannot read", {"org.surfaces.undecryptable": {"session_id": "S1"}}))
    second = t.add(ALICE, {**sealed, "session_id": "S2"}, "m.room.encrypted")
    t.user("readable")
    scan = scan_timeline(list(reversed(t.events)), ALICE, BOT, 0)
    assert [e["event_id"] for e in scan.undecryptable] == [first, second]
    assert scan.noticed_sessions == {"S1"}
    assert [e["content"]["body"] for e in scan.missed] == ["readable"]


def owner_edit(t: Timeline, target: str, body: str) -> str:
    """Alice's edit of her message `target`, as Element sends it."""
    new = {"msgtype": "m.text", "body": body}
    return t.add(ALICE, {"msgtype": "m.text", "body": f"* {body}", "m.new_content": new,
                         "m.relates_to": {"rel_type": "m.replace", "event_id": target}})


def regenerated(t: Timeline, answer: str, body: str, question: str, revision: str) -> None:
    """The bot's in-place edit of `answer`, made for Alice's edit `revision`."""
    marker = layout.turn_marker(CHAT, "echo", answers=question, revision=revision)
    t.add(BOT, replies.edit(answer, replies.rendered(body, "m.text", marker)))


def scan(t: Timeline, after_ts: int = 0):
    return scan_timeline(list(reversed(t.events)), ALICE, BOT, after_ts,
                         is_command=lambda body: body.startswith("!ai "))


def test_a_rebuild_has_the_text_of_the_owners_latest_edit() -> None:
    t = Timeline()
    q = t.user("first try")
    a = t.add(BOT, replies.rendered("re first", "m.text", layout.turn_marker(CHAT, "echo", answers=q)))
    owner_edit(t, q, "second try")
    e2 = owner_edit(t, q, "third try")
    regenerated(t, a, "re third", q, e2)
    owner_edit(t, q, "!ai reset")  # an edit never turns a message into a command
    assert [(x.role, x.content) for x in t.history().turns] == [
        ("user", "third try"),
        ("assistant", "re third"),
    ]


def test_catch_up_answers_an_edit_the_answer_was_not_regenerated_for() -> None:
    t = Timeline()
    q = t.user("question")
    a = t.add(BOT, replies.rendered("re", "m.text", layout.turn_marker(CHAT, "echo", answers=q)))
    owner_edit(t, q, "better question")
    newest = owner_edit(t, q, "best question")  # sent while the bot was down
    found = scan(t)
    assert found.answered == q and found.missed == []
    assert found.edit is not None and found.edit["event_id"] == newest

    regenerated(t, a, "re best", q, newest)  # answered: a later scan finds nothing to do
    assert scan(t).edit is None


def test_catch_up_reads_a_missed_message_as_its_latest_edit_says() -> None:
    t = Timeline()
    q = t.user("question")
    t.add(BOT, replies.rendered("re", "m.text", layout.turn_marker(CHAT, "echo", answers=q)))
    missed = t.user("typo")
    owner_edit(t, missed, "fixed")
    owner_edit(t, q, "!ai help")  # a command edit is no new text
    found = scan(t)
    assert [e["content"]["body"] for e in found.missed] == ["fixed"]
    assert found.edit is None


def test_a_regeneration_cut_off_by_a_crash_is_interrupted_not_answered_again() -> None:
    t = Timeline()
    q = t.user("question")
    a = t.add(BOT, replies.rendered("re", "m.text", layout.turn_marker(CHAT, "echo", answers=q)))
    edit = owner_edit(t, q, "better question")
    marker = layout.turn_marker(CHAT, "echo", answers=q, partial=True, revision=edit)
    t.add(BOT, replies.edit(a, replies.rendered("re bet", "m.text", marker)))
    found = scan(t)
    assert found.interrupted is not None and found.interrupted.marker.revision == edit
    assert found.edit is None
