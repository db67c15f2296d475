"""The usage ledger's arithmetic: tallies over a turn's requests, UTC days, reset times, the
usage carried in markers (and read back from any JSON without raising), and the quota config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from surfaces_plugin import layout
from surfaces_plugin.backends import ChatMessage, ToolCall, Usage
from surfaces_plugin.config import ConfigError, parse_settings
from surfaces_plugin.context_window import message_tokens
from surfaces_plugin.tokens import estimate_tokens
from surfaces_plugin.usage import (
    DAY_MS,
    Tally,
    answer_entry,
    day_start_ms,
    duration_text,
    usage_in,
    utc_day,
    window_start_ms,
)

BASE = YAML(typ="safe").load((Path(__file__).parents[2] / "base-config.yaml").read_text())
# 2026-03-01 23:59:59.999 UTC and one millisecond later.
LAST_MS_OF_MARCH_1 = 1772409599999
ASKED = [ChatMessage("system", "Be brief."), ChatMessage("user", "What is the capital of Peru?")]


def test_a_tally_adds_every_request_of_a_turn_as_reported() -> None:
    tally = Tally()
    assert tally.usage is None  # no request: nothing to count
    tally.add(Usage(120, 8), ASKED, "", [ToolCall("c1", "lookup", {"q": "Peru"})])
    tally.add(Usage(150, 30), ASKED, "Lima.")
    assert tally.usage == layout.TokenUsage(270, 38, estimated=False)


def test_what_a_backend_does_not_report_is_estimated_and_marked() -> None:
    tally = Tally()
    tally.add(None, ASKED, "Lima is the capital.")
    prompt = sum(message_tokens(m) for m in ASKED)
    assert tally.usage == layout.TokenUsage(prompt, estimate_tokens("Lima is the capital."), True)
    half = Tally()
    half.add(Usage(prompt_tokens=40, completion_tokens=None), ASKED, "Lima.")
    assert half.usage == layout.TokenUsage(40, estimate_tokens("Lima."), True)


def test_days_are_utc_and_turn_at_midnight() -> None:
    assert utc_day(LAST_MS_OF_MARCH_1) == "2026-03-01"
    assert utc_day(LAST_MS_OF_MARCH_1 + 1) == "2026-03-02"
    assert day_start_ms(LAST_MS_OF_MARCH_1 + 1) == LAST_MS_OF_MARCH_1 + 1
    assert day_start_ms(LAST_MS_OF_MARCH_1) == LAST_MS_OF_MARCH_1 + 1 - DAY_MS
    # Today and the six days before it.
    assert utc_day(window_start_ms(LAST_MS_OF_MARCH_1)) == "2026-02-23"


def test_the_time_to_the_reset_reads_in_hours_and_minutes() -> None:
    assert duration_text(5 * 3_600_000 + 12 * 60_000 + 59_000) == "5 h 12 min"
    assert duration_text(12 * 60_000) == "12 min"
    assert duration_text(59_999) == "under a minute"


def test_only_an_answers_final_version_carries_usage() -> None:
    usage = layout.TokenUsage(10, 4, estimated=True)
    final = layout.turn_marker("c", "a", answers="$q", usage=usage)
    partial = layout.turn_marker("c", "a", answers="$q", partial=True, usage=usage)
    assert final[layout.TURN_KEY]["usage"] == {"prompt": 10, "completion": 4, "estimated": True}
    assert "usage" not in partial[layout.TURN_KEY]
    assert layout.parse_turn_marker(final).usage == usage


@pytest.mark.parametrize(
    "bad",
    [None, 3, "10", [], {"prompt": 1}, {"prompt": -1, "completion": 2},
     {"prompt": True, "completion": 2}, {"prompt": 1.5, "completion": 2}],
)
def test_malformed_usage_is_ignored_and_the_marker_still_counts(bad: object) -> None:
    content = {layout.TURN_KEY: {"platform_chat_id": "c", "agent": "a", "usage": bad}}
    marker = layout.parse_turn_marker(content)
    assert marker is not None and marker.usage is None


def test_usage_is_read_back_from_an_edit_under_the_answer_it_belongs_to() -> None:
    bot = "@bot:x"
    marker = layout.turn_marker("c", "gpt", answers="$q", usage=layout.TokenUsage(7, 3))
    edit = {
        "event_id": "$edit",
        "sender": bot,
        "origin_server_ts": 5,
        "content": {
            **marker,
            "m.new_content": {"body": "hi", **marker},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$answer"},
        },
    }
    assert usage_in(edit) == ("answer $q", "gpt", layout.TokenUsage(7, 3))
    # A retry answers the same message again: its own entry (the `!ai retry` names it).
    retried = {**edit, "content": {**edit["content"], **layout.command_marker("$retry")}}
    assert usage_in(retried)[0] == answer_entry("$q", "$retry", "$answer") == "answer $q $retry"
    summary = {
        "event_id": "$sum",
        "sender": bot,
        "content": layout.summary_marker("c", "$q", layout.TokenUsage(50, 9, True), "gpt"),
    }
    assert usage_in(summary) == ("$sum", "gpt", layout.TokenUsage(50, 9, True))
    assert usage_in({"event_id": "$x", "content": {"body": "no marker"}}) is None


def config(**limits: object) -> dict:
    data = copy.deepcopy(BASE)
    data["limits"] = {**data["limits"], **limits}
    return data


def test_quotas_are_read_and_zero_means_none() -> None:
    settings = parse_settings(config())
    assert settings.limits.daily_tokens_per_user == 0
    data = config(daily_tokens_per_user=50000)
    data["agents"][0]["daily_tokens_per_user"] = 2000
    settings = parse_settings(data)
    assert settings.limits.daily_tokens_per_user == 50000
    assert settings.agents["echo"].daily_tokens_per_user == 2000


@pytest.mark.parametrize("value", [-1, 1.5, "lots", True])
def test_a_bad_quota_is_refused_naming_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as overall:
        parse_settings(config(daily_tokens_per_user=value))
    assert overall.value.key == "limits.daily_tokens_per_user"
    data = config()
    data["agents"][0]["daily_tokens_per_user"] = value
    with pytest.raises(ConfigError) as per_agent:
        parse_settings(data)
    assert per_agent.value.key == "agents[0].daily_tokens_per_user"
