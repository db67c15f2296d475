"""Budget assembly (pure): what goes into a request, in which order, and what is cut."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from surfaces_plugin.backends import ChatMessage
from surfaces_plugin.config import AgentSpec
from surfaces_plugin.context_builder import system_prompt
from surfaces_plugin.context_window import (
    MESSAGE_OVERHEAD_TOKENS,
    Turn,
    assemble,
    chunk_turns,
    compaction_split,
    conversation_seed,
    message_tokens,
    truncate_to_tokens,
)
from surfaces_plugin.layout import Binding
from surfaces_plugin.rooms import WorkingRoom
from surfaces_plugin.tokens import heuristic_tokens

FIXTURES = Path(__file__).parent / "fixtures"
ESTIMATE_ERROR_BOUND = 0.35  # the heuristic stays within ±35% of cl100k_base on every sample


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def bot(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


def conversation(n: int, words: int = 20) -> list[ChatMessage]:
    return [
        (user if i % 2 == 0 else bot)(f"turn {i} " + " ".join(["word"] * words)) for i in range(n)
    ]


def test_order_is_system_memory_summary_then_turns() -> None:
    window = assemble(
        system_prompt="Be brief.",
        memory=["lives in Berlin", "prefers metric units"],
        summary="They planned a trip.",
        turns=[user("hi"), bot("hello"), user("and now?")],
        budget=4096,
    )
    system, *turns = window.messages
    assert system.role == "system"
    assert system.content.index("Be brief.") < system.content.index("- lives in Berlin")
    assert system.content.index("- prefers metric units") < system.content.index(
        "They planned a trip."
    )
    assert [t.content for t in turns] == ["hi", "hello", "and now?"]
    assert window.summary_used and window.memory_notes == 2 and window.turns_omitted == 0


def test_no_system_message_when_there_is_nothing_to_say() -> None:
    window = assemble(system_prompt="  ", memory=(), summary=None, turns=[user("hi")], budget=256)
    assert window.messages == [user("hi")]


def test_oldest_turns_are_cut_first_and_the_window_stays_within_budget() -> None:
    turns = conversation(30)
    window = assemble(system_prompt="sys", memory=(), summary=None, turns=turns, budget=300)
    kept = window.messages[1:]
    assert 0 < len(kept) < 30
    assert kept == turns[-len(kept) :]  # a contiguous run of the newest turns
    assert window.turns_omitted == 30 - len(kept)
    assert window.over_budget
    assert window.tokens <= 300
    assert window.tokens == sum(message_tokens(m) for m in window.messages)


def test_the_latest_turn_is_sent_even_when_it_alone_is_over_budget() -> None:
    huge = user("lorem ipsum " * 2000)
    window = assemble(
        system_prompt="sys", memory=(), summary=None, turns=[user("old"), huge], budget=256
    )
    assert window.messages[-1] == huge
    assert window.turns_included == 1 and window.turns_omitted == 1
    assert window.tokens > 256


def test_a_big_preamble_leaves_fewer_turns() -> None:
    turns = conversation(10)
    plain = assemble(system_prompt="", memory=(), summary=None, turns=turns, budget=400)
    crowded = assemble(
        system_prompt="", memory=(), summary="summary " * 150, turns=turns, budget=400
    )
    assert crowded.turns_included < plain.turns_included


def test_counts_reported_by_the_backend_replace_the_estimate() -> None:
    text = "some answer " * 20
    estimated = assemble(
        system_prompt="", memory=(), summary=None, turns=[Turn(bot(text))], budget=4096
    )
    counted = assemble(
        system_prompt="", memory=(), summary=None, turns=[Turn(bot(text), 7)], budget=4096
    )
    assert counted.tokens == 7 + MESSAGE_OVERHEAD_TOKENS
    assert estimated.tokens != counted.tokens
    assert counted.messages == [bot(text)]


def test_scale_corrects_the_estimate() -> None:
    turns = [user("word " * 100)]
    one = assemble(system_prompt="", memory=(), summary=None, turns=turns, budget=4096)
    two = assemble(system_prompt="", memory=(), summary=None, turns=turns, budget=4096, scale=2)
    assert two.tokens - MESSAGE_OVERHEAD_TOKENS == 2 * (one.tokens - MESSAGE_OVERHEAD_TOKENS)


def test_room_override_wins_over_the_agents_prompt() -> None:
    agent = AgentSpec(id="a", name="A", description="", backend="echo", system_prompt="default")
    binding = Binding(owner="@u:x", space_id="!s", agent="a", title="t", platform_chat_id="c-1")
    room = WorkingRoom("!r", binding)
    assert system_prompt(room, agent) == "default"
    custom = WorkingRoom("!r", replace(binding, system_prompt="custom"))
    assert system_prompt(custom, agent) == "custom"
    empty = WorkingRoom("!r", replace(binding, system_prompt=""))
    assert system_prompt(empty, agent) == ""  # an explicit empty override holds too


def test_compaction_keeps_the_newest_turns_that_fit_and_the_last_question() -> None:
    turns = conversation(20)
    per_turn = message_tokens(turns[0])
    split = compaction_split(turns, keep_tokens=per_turn * 4.5, scale=1.0)
    assert split == 16  # four turns fit in the room kept
    assert compaction_split(turns, keep_tokens=10_000) == 0  # everything fits: nothing to do
    # Even with no room at all, the last user turn and the answer after it stay.
    assert compaction_split(turns, keep_tokens=0) == 18
    assert compaction_split(turns[:-1], keep_tokens=0) == 18


def test_chunks_stay_within_the_limit_and_keep_order() -> None:
    turns = conversation(12) + [user("long " * 3000)]
    chunks = chunk_turns(turns, limit=120)
    assert [m.content[:7] for chunk in chunks for m in chunk][:12] == [
        t.content[:7] for t in turns[:12]
    ]
    for chunk in chunks:
        assert sum(message_tokens(m) for m in chunk) <= 120
    assert chunks[-1][-1].content.endswith("…")  # the over-long turn was cut, not dropped


def test_truncate_to_tokens() -> None:
    text = "alpha beta gamma delta " * 200
    cut = truncate_to_tokens(text, 50)
    assert cut.endswith("…") and heuristic_tokens(cut) <= 50
    assert truncate_to_tokens("short", 50) == "short"


def _samples() -> list[dict]:
    return json.loads((FIXTURES / "token_counts.json").read_text(encoding="utf-8"))["samples"]


@pytest.mark.parametrize("sample", _samples(), ids=lambda s: s["name"])
def test_estimate_is_close_to_cl100k_counts(sample: dict) -> None:
    # Reference counts were recorded once with tiktoken (cl100k_base); no tokenizer needed here.
    estimate = heuristic_tokens(sample["text"])
    error = (estimate - sample["tokens"]) / sample["tokens"]
    assert abs(error) <= ESTIMATE_ERROR_BOUND, f"{estimate} vs {sample['tokens']} ({error:+.0%})"


def test_estimate_over_all_samples_is_close_in_total() -> None:
    samples = _samples()
    assert len(samples) >= 12
    total = sum(s["tokens"] for s in samples)
    estimated = sum(heuristic_tokens(s["text"]) for s in samples)
    assert abs(estimated - total) / total <= 0.10


def test_a_conversation_seed_stops_at_the_last_answer() -> None:
    system = ChatMessage("system", "Be brief.")
    asked, answered = ChatMessage("user", "one"), ChatMessage("assistant", "re: one")
    pending = ChatMessage("user", "two")
    # The pending question goes in the next request; seeding it too would send it twice.
    assert conversation_seed([system, asked, answered, pending]) == [system, asked, answered]
    assert conversation_seed([system, asked, answered]) == [system, asked, answered]
    assert conversation_seed([system, pending]) == []
