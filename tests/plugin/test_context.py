"""Context management as a user sees it: budget, compaction, reset, system prompt, memory, export
and history rebuilt from the timeline."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator

from surfaces_plugin import layout, replies
from surfaces_plugin.backends import Backend, BackendError, Chunk, ErrorKind, GenerationRequest
from surfaces_plugin.catchup import COMPACTION_INTERRUPTED
from surfaces_plugin.compaction import instructions
from surfaces_plugin.memory import MAX_NOTE_CHARS, MAX_NOTES

from .conftest import BASE_CONFIG

ALICE = "@alice:localhost"
SUMMARY_START = instructions(100)[:40]


class RecordingBackend(Backend):
    """Answers `re: <first words>`; summarisation requests get `summary #n`. Records both."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.requests: list[GenerationRequest] = []
        self.summaries: list[GenerationRequest] = []
        self.fail_summary: BackendError | None = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.messages[0].content.startswith(SUMMARY_START):
            self.summaries.append(request)
            if self.fail_summary is not None:
                raise self.fail_summary
            yield Chunk(f"summary #{len(self.summaries)}")
            return
        self.requests.append(request)
        yield Chunk("re: " + request.messages[-1].content[:20])

    def turns(self, index: int = -1) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.requests[index].messages if m.role != "system"]

    def system(self, index: int = -1) -> str:
        first = self.requests[index].messages[0]
        return first.content if first.role == "system" else ""


def agents(**changes) -> list[dict]:
    agent = copy.deepcopy(BASE_CONFIG["agents"][0])
    agent.update(changes)
    return [agent]


async def forget_messages(h, platform_chat_id: str) -> None:
    """The database loses a conversation's history (what a rebuild must recover)."""
    await h.app.stores.db.execute("DELETE FROM messages WHERE platform_chat_id=$1", platform_chat_id)

async def onboarded(make_surfaces, client=None, **agent_changes):
    h = await make_surfaces(
        client, streaming={"enabled": False}, agents=agents(**agent_changes),
    )
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    backend = RecordingBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    return h, room.room_id, backend, dm


def words(n: int, tag: str = "") -> str:
    return (f"{tag} " if tag else "") + " ".join(["word"] * n)


def binding(h, room: str) -> dict:
    return h.client.rooms[room].state[(layout.BINDING_TYPE, "")][1]


def pcid(h, room: str) -> str:
    return h.app.rooms.room(room).platform_chat_id


# !ai context


async def test_context_shows_messages_tokens_and_budget(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "first")
    await h.say(room, ALICE, "second")
    await h.say(room, ALICE, "!ai context")
    reply = h.last_reply(room)
    assert "**Context of the next request to `echo`**" in reply
    assert "- messages: 5 (4 turns plus the system message)" in reply
    assert "of 4096 (" in reply and "- tokens: about " in reply
    assert "- system prompt: `echo`'s default" in reply
    assert "- summary: none" in reply
    assert "- turns left out: 0" in reply
    assert "- memory notes: 0" in reply


async def test_context_says_how_many_turns_are_left_out(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces, context_tokens=2000)
    for i in range(6):
        await h.say(room, ALICE, words(200, f"m{i}"))
    h.app.settings.agents["echo"] = h.app.settings.agents["echo"].__class__(
        **{**h.app.settings.agents["echo"].__dict__, "context_tokens": 400}
    )
    await h.say(room, ALICE, "!ai context")
    reply = h.last_reply(room)
    assert "of 400 (" in reply
    assert "- turns left out: 9" in reply  # the newest question and the answers around it fit
    assert "`!ai compact` summarises them" in reply


# !ai compact


async def test_compact_with_little_history_says_nothing_to_do(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai compact")
    assert h.last_reply(room) == "Nothing to compact yet."
    await h.say(room, ALICE, "hello")
    await h.say(room, ALICE, "!ai compact")
    assert h.last_reply(room) == "Nothing to compact yet."
    assert backend.summaries == []


async def test_compact_posts_a_summary_that_replaces_older_turns(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, context_tokens=1000)
    for i in range(6):
        await h.say(room, ALICE, words(100, f"m{i}"))
    await h.say(room, ALICE, "!ai compact")
    bodies = h.client.bodies(room)
    summary_notice = bodies[-2]
    assert summary_notice.startswith("**Summary of the earlier conversation** (")
    assert summary_notice.endswith("\n\nsummary #1")
    assert bodies[-1].startswith("Compacted: ") and "older messages are now summarised" in bodies[-1]
    # The summarisation request saw the oldest turns as a transcript.
    transcript = backend.summaries[0].messages[1].content
    assert "User: m0 word" in transcript and "Assistant: re: m0" in transcript

    events = h.client.messages(room)
    marker = events[-2]["content"][layout.SUMMARY_KEY]
    chat = await h.app.stores.chats.get(pcid(h, room))
    upto = await h.app.stores.messages.history(pcid(h, room))
    upto_message = next(m for m in upto if m.seq == chat.summary_upto_seq)
    assert marker["platform_chat_id"] == pcid(h, room)
    assert marker["upto_event_id"] == upto_message.event_id
    # The scripted backend reports no usage: what the summary cost is estimated, and says so.
    assert marker["agent"] == "echo" and marker["usage"]["estimated"] is True
    assert chat.summary == "summary #1"

    await h.say(room, ALICE, "next")
    assert "Summary of the earlier conversation:\nsummary #1" in backend.system()
    sent = [c for _, c in backend.turns()]
    assert not any(c.startswith("m0 ") for c in sent)  # the summarised turns are left out
    assert sent[-1] == "next"
    await h.say(room, ALICE, "!ai context")
    assert "- summary: yes, it stands for the first" in h.last_reply(room)
    assert "- turns left out: 0" in h.last_reply(room)


async def test_compact_failure_is_explained(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, context_tokens=1000)
    for i in range(6):
        await h.say(room, ALICE, words(100, f"m{i}"))
    backend.fail_summary = BackendError(ErrorKind.SERVER, "boom", status=502)
    await h.say(room, ALICE, "!ai compact")
    assert h.last_reply(room).startswith("Could not compact the conversation: The agent `echo`")
    assert (await h.app.stores.chats.get(pcid(h, room))).summary is None


async def test_automatic_compaction_when_the_budget_overflows(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, context_tokens=256)
    for i in range(5):
        await h.say(room, ALICE, words(60, f"m{i}"))
    assert backend.summaries, "the long history was compacted"
    events = h.client.messages(room)
    progress = next(
        e for e in events
        if e["content"].get("body") == "Compacting the conversation to fit `echo`'s context budget…"
    )
    edits = [
        e for e in events
        if (e["content"].get("m.relates_to") or {}).get("event_id") == progress["event_id"]
    ]
    assert edits and edits[-1]["content"]["m.new_content"]["body"].startswith(
        "Compacted the conversation to fit `echo`'s context budget: "
    )
    bodies = h.client.bodies(room)
    assert any(b.startswith("**Summary of the earlier conversation**") for b in bodies)
    assert bodies[-1] == "re: m4 word word word wo"  # and the answer still came
    # Every answer's request fitted: nothing left out after compaction.
    last = backend.requests[-1]
    assert "Summary of the earlier conversation:" in last.messages[0].content
    assert last.messages[-1].content.startswith("m4 ")
    await h.say(room, ALICE, "!ai context")
    assert "- turns left out: 0" in h.last_reply(room)


async def test_automatic_compaction_failure_still_answers(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, context_tokens=256)
    backend.fail_summary = BackendError(ErrorKind.TIMEOUT, "slow", timeout_s=5)
    for i in range(4):
        await h.say(room, ALICE, words(60, f"m{i}"))
    bodies = h.client.bodies(room)
    assert any(b.startswith("Could not compact the conversation (`echo`: timeout") for b in bodies)
    assert bodies[-1] == "re: m3 word word word wo"
    assert backend.turns()[-1][1].startswith("m3 ")


# !ai reset


async def test_reset_starts_a_fresh_conversation_and_archives_the_old(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    old = pcid(h, room)
    await h.say(room, ALICE, "remember the old days")
    await h.say(room, ALICE, "!ai reset")
    new = pcid(h, room)
    assert new != old and new.startswith("echo-")
    assert binding(h, room)["platform_chat_id"] == new
    notice = h.client.messages(room)[-1]["content"]
    assert notice["msgtype"] == "m.notice"
    assert notice[layout.RESET_KEY] == {"platform_chat_id": new}
    assert notice["body"].startswith("Started a fresh conversation with `echo`")
    old_chat, new_chat = await h.app.stores.chats.get(old), await h.app.stores.chats.get(new)
    assert old_chat.archived and not new_chat.archived and new_chat.room_id == room
    assert [m.content for m in await h.app.stores.messages.history(old)] == [
        "remember the old days",
        "re: remember the old day",
    ]
    await h.say(room, ALICE, "hello again")
    assert backend.turns() == [("user", "hello again")]
    assert any(  # the old conversation stays in the timeline
e["content"].get("body") == "remember the old days"
               for e in h.client.room_events(room))


# !ai system


async def test_system_prompt_show_set_and_clear(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai system")
    assert h.last_reply(room) == (
        "This room uses `echo`'s default system prompt:\n\n> You are a helpful assistant."
    )
    await h.say(room, ALICE, "!ai system You are a pirate. Answer in rhymes.")
    assert h.last_reply(room).startswith("This room's system prompt is set (35 characters)")
    assert binding(h, room)["system_prompt"] == "You are a pirate. Answer in rhymes."
    await h.say(room, ALICE, "!ai system")
    assert "an override" in h.last_reply(room)
    assert h.last_reply(room).endswith("> You are a pirate. Answer in rhymes.")
    await h.say(room, ALICE, "ahoy")
    assert backend.system() == "You are a pirate. Answer in rhymes."
    await h.say(room, ALICE, "!ai context")
    assert "- system prompt: this room's override" in h.last_reply(room)

    await h.say(room, ALICE, "!ai system -")
    assert h.last_reply(room) == (
        "Override cleared: this room uses `echo`'s default system prompt again."
    )
    assert "system_prompt" not in binding(h, room)
    await h.say(room, ALICE, "!ai system -")
    assert "no override" in h.last_reply(room)
    await h.say(room, ALICE, "ahoy again")
    assert backend.system() == "You are a helpful assistant."


async def test_system_prompt_too_long_is_refused_with_the_limit(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai system " + "x" * 4001)
    assert h.last_reply(room) == (
        "That system prompt has 4001 characters; the limit is 4000.\n"
        "Usage: `!ai system [text | -]`"
    )
    assert "system_prompt" not in binding(h, room)


# !ai memory


async def test_memory_is_shared_by_all_rooms_of_the_user(make_surfaces) -> None:
    h, room, backend, dm = await onboarded(make_surfaces)
    await h.say(dm, ALICE, "!ai memory")
    assert h.last_reply(dm).startswith("You have no shared notes yet.")
    await h.say(room, ALICE, "!ai memory add I live in Berlin and use metric units.")
    assert h.last_reply(room).startswith("Noted as 1.")
    await h.say(dm, ALICE, "!ai memory add   My name is   Alice  ")
    await h.say(dm, ALICE, "!ai new Second")
    second = next(r.room_id for r in h.app.rooms.all_rooms() if r.title == "Second")
    await h.say(second, ALICE, "where do I live?")
    assert "- I live in Berlin and use metric units.\n- My name is Alice" in backend.system()

    space = await h.app.onboarding.space_of(ALICE)
    assert h.client.rooms[space].state[(layout.MEMORY_TYPE, "")][1] == {
        "v": 1, "notes": ["I live in Berlin and use metric units.", "My name is Alice"],
    }
    await h.say(dm, ALICE, "!ai memory")
    assert h.last_reply(dm).endswith(
        "1. I live in Berlin and use metric units.\n2. My name is Alice"
    )
    await h.say(second, ALICE, "!ai context")
    assert "- memory notes: 2" in h.last_reply(second)

    await h.say(dm, ALICE, "!ai memory forget 1")
    assert h.last_reply(dm) == "Forgot note 1: I live in Berlin and use metric units."
    await h.say(room, ALICE, "and now?")
    assert "Berlin" not in backend.system() and "- My name is Alice" in backend.system()


async def test_memory_bad_input_gets_reason_and_usage(make_surfaces) -> None:
    h, _, _, dm = await onboarded(make_surfaces)
    usage = "Usage: `!ai memory [add <text> | forget <n>]`"
    await h.say(dm, ALICE, "!ai memory add")
    assert h.last_reply(dm) == f"What should I remember?\n{usage}"
    await h.say(dm, ALICE, "!ai memory forget 1")
    assert h.last_reply(dm) == "You have no notes to forget."
    await h.say(dm, ALICE, "!ai memory add one")
    await h.say(dm, ALICE, "!ai memory forget two")
    assert h.last_reply(dm) == f"`two` is not a note number; `!ai memory` lists them.\n{usage}"
    await h.say(dm, ALICE, "!ai memory forget 5")
    assert h.last_reply(dm) == f"There is no note 5; you have 1 (numbers 1 to 1).\n{usage}"
    await h.say(dm, ALICE, "!ai memory forget")
    assert h.last_reply(dm) == f"Which note? Give its number.\n{usage}"
    await h.say(dm, ALICE, "!ai memory drop 1")
    assert h.last_reply(dm).startswith("`drop` is not a memory action")
    await h.say(dm, ALICE, "!ai memory add " + "y" * (MAX_NOTE_CHARS + 1))
    assert f"the limit is {MAX_NOTE_CHARS}" in h.last_reply(dm)


async def test_memory_cap_on_the_number_of_notes(make_surfaces) -> None:
    h, _, _, dm = await onboarded(make_surfaces)
    for i in range(MAX_NOTES):
        await h.say(dm, ALICE, f"!ai memory add note {i}")
    await h.say(dm, ALICE, "!ai memory add one too many")
    assert h.last_reply(dm).startswith(f"You already have {MAX_NOTES} notes, the most I keep.")
    assert len((await h.app.stores.memory.get(ALICE)).notes) == MAX_NOTES


async def test_memory_needs_a_space(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai memory add hi")
    assert h.last_reply(dm).startswith("Shared memory lives in your Space, and you have none yet.")


async def test_memory_is_read_from_the_space_when_the_cache_lost_it(make_surfaces) -> None:
    h, room, backend, dm = await onboarded(make_surfaces)
    await h.say(dm, ALICE, "!ai memory add likes tea")
    await h.app.stores.db.execute("DELETE FROM memory WHERE user_id=$1", ALICE)
    await h.say(room, ALICE, "hello")
    assert "- likes tea" in backend.system()


# !ai export


async def test_export_uploads_the_conversation_as_markdown(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces, context_tokens=1000)
    await h.say(room, ALICE, "!ai export")
    assert h.last_reply(room) == "There is nothing to export yet: this conversation has no messages."
    for i in range(6):
        await h.say(room, ALICE, words(100, f"m{i}"))
    await h.say(room, ALICE, "!ai compact")
    await h.say(room, ALICE, "!ai export")
    file_event = h.client.messages(room)[-1]["content"]
    assert file_event["msgtype"] == "m.file"
    assert file_event["body"].startswith("general-") and file_event["body"].endswith(".md")
    data, mime, name = h.client.media[file_event["url"]]
    assert mime == "text/markdown" and name == file_event["body"]
    assert file_event["info"] == {"mimetype": "text/markdown", "size": len(data)}
    text = data.decode()
    assert text.startswith("# General\n")
    assert "- Agent: Echo (`echo`)" in text
    assert "- Messages: 12" in text
    assert "## Summary (stands for the first" in text and "summary #1" in text
    assert f"### You ({ALICE})" in text and "m5 word word" in text
    assert "### Echo · " in text and "re: m0 word word" in text
    assert text.index("m0 word") < text.index("m5 word")


# history rebuilt from the timeline


async def test_history_is_rebuilt_from_the_timeline_when_the_cache_lost_it(
    make_surfaces,
) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, context_tokens=1000)
    await h.say(room, ALICE, "!ai reset")  # the rebuild stops at the reset notice
    for i in range(6):
        await h.say(room, ALICE, words(100, f"m{i}"))
    await h.say(room, ALICE, "!ai compact")
    await h.say(room, ALICE, "!ai context")
    chat_id = pcid(h, room)
    before = await h.app.stores.messages.history(chat_id)
    summary_seq = (await h.app.stores.chats.get(chat_id)).summary_upto_seq

    # The database loses the history and the summary; a new process starts.
    await forget_messages(h, chat_id)
    await h.app.stores.chats.set_summary(chat_id, None, None)
    h2 = await restarted(make_surfaces, h)
    backend2 = RecordingBackend(h2.app.settings.backends["echo"])
    h2.app.backends.put(backend2)
    h2.client.page_limit = 4  # read back page by page
    await h2.say(room, ALICE, "after the loss")

    after = await h2.app.stores.messages.history(chat_id)
    assert [(m.role, m.content, m.event_id) for m in after[:-2]] == [
        (m.role, m.content, m.event_id) for m in before
    ]
    assert [m.content for m in after[-2:]] == ["after the loss", "re: after the loss"]
    chat = await h2.app.stores.chats.get(chat_id)
    assert chat.summary == "summary #1" and chat.summary_upto_seq == summary_seq
    assert "Summary of the earlier conversation:\nsummary #1" in backend2.system()
    sent = [c for _, c in backend2.turns()]
    assert sent[-1] == "after the loss" and not any(c.startswith("m0 ") for c in sent)
    assert h2.client.pages_read > 2


async def test_rebuild_uses_the_final_text_of_streamed_answers(make_surfaces) -> None:
    h = await make_surfaces(streaming={"edit_interval_ms": 0})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "one two three four")
    await forget_messages(h, room.platform_chat_id)
    h2 = await make_surfaces(h.client, streaming={"edit_interval_ms": 0})
    backend = RecordingBackend(h2.app.settings.backends["echo"])
    h2.app.backends.put(backend)
    await h2.say(room.room_id, ALICE, "five")
    assert backend.turns() == [
        ("user", "one two three four"),
        ("assistant", "echo: one two three four"),
        ("user", "five"),
    ]


async def restarted(make_surfaces, h):
    """A second Surfaces on the same homeserver and database (a restart)."""
    return await make_surfaces(
        h.client, streaming={"enabled": False}, agents=agents(context_tokens=1000)
    )


# help


async def test_help_lists_the_context_commands_in_order(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai help")
    body = h.last_reply(dm)
    order = ["!ai agent <id>", "!ai reset", "!ai context", "!ai compact", "!ai system [text | -]",
             "!ai memory [add <text> | forget <n>]", "!ai retry", "!ai cancel", "!ai export",
             "!ai archive"]
    positions = [body.index(f"`{c}`") for c in order]
    assert positions == sorted(positions)


async def test_system_prompt_may_span_lines(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai system\nYou are terse.\n\nNever apologise.")
    assert binding(h, room)["system_prompt"] == "You are terse.\n\nNever apologise."
    await h.say(room, ALICE, "!ai system")
    assert h.last_reply(room).endswith("> You are terse.\n>\n> Never apologise.")
    await h.say(room, ALICE, "hi")
    assert backend.system() == "You are terse.\n\nNever apologise."


async def test_a_compaction_notice_cut_off_by_a_crash_is_ended_after_the_restart(
    make_surfaces,
) -> None:
    h, room, _backend, _dm = await onboarded(make_surfaces)
    await h.app.stop()
    # What a crash while compacting leaves: the notice posted, no edit ending it, the message
    # being answered still unanswered.
    cut = await h.client.send_message_event(
        room,
        "m.room.message",
        replies.notice(
            "Compacting the conversation…", layout.compacting_marker(pcid(h, room))
        ),
    )
    h.client.user_message(room, ALICE, "sent before the crash")
    h2 = await restarted(make_surfaces, h)
    await h2.settle()
    shown = h2.client.bodies(room)
    assert "Compacting the conversation…" not in shown  # no notice left looking unfinished
    assert shown.count(COMPACTION_INTERRUPTED) == 1
    assert cut in {e["event_id"] for e in h2.client.messages(room)}
    assert shown[-1] == "echo: sent before the crash"
