"""Streaming: when an answer's text first shows, when it is complete, and how it gets there.

A local OpenAI-compatible server (devtools/fake_openai.py, in a thread of this process) streams
every answer like a model: first words 400 ms after the request, then one word every 40 ms
(25 words/s), 60 words, so done at about 2.8 s. Surfaces (standalone maubot, the shipped
streaming settings) answers one user on a real Synapse. Everything is timed on this process's
clock: when the server received the request and wrote each word, when the user's sync delivered
each event, and, before every answer, one homeserver send (the user's own message, from the
request to its sync), so the ideal is known in the same run:

- first text: the first post's arrival; ideal = the first complete sentence written + one send
- complete: the final text's arrival; ideal = the stream's end + one send
- events per answer (post + edits), edits/s (edits over the span from the first post to the
  final text), and the share of first posts (what phones show) that end a sentence.

    .venv/bin/python -m bench.streaming [--answers 40] [--quick] [--modes on,off]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._bots import make_user, surfaces_rooms
from bench._common import median, percentile, table, write_result
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import MatrixUser, is_edit
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from devtools.threaded import Threaded

FIRST_WORDS_S = 0.4
WORD_S = 0.04  # 25 words a second
WORDS = 60
TARGETS = {
    "first_text_over_ideal_s": 0.15,
    "first_post_ends_sentence_share": 0.8,
    "complete_over_ideal_s": 0.3,
    "edits_per_s": 1.0,
}
_SENTENCE_END = re.compile(r"[.!?]$")

# Sentences for the answers: the first of each answer varies in length (3 to 9 words).
_OPENERS = [
    "Yes, it is.",
    "{a} plus {b} is {c}.",
    "The sum of {a} and {b} is {c}.",
    "Adding {b} to {a} gives you {c} in total.",
    "If you add {a} and {b} together you get {c}.",
]
_FILLERS = [
    "To check, start at {a} and count up by {b}.",
    "Each step moves you one place along the number line.",
    "You can also count on your fingers if that helps.",
    "The order does not matter, so {b} plus {a} is the same.",
    "That is why addition is called commutative.",
    "Try a few more pairs and the pattern becomes clear.",
    "Small sums like this one are easy to do in your head.",
]


def answer_text(i: int) -> str:
    """Answer `i`: an opener, then filler sentences, cut to WORDS words ending in a period."""
    rng = random.Random(i)
    a, b = rng.randint(1, 20), rng.randint(0, 20)
    values = {"a": a, "b": b, "c": a + b}
    words = _OPENERS[i % len(_OPENERS)].format(**values).split()
    while len(words) < WORDS:
        words += rng.choice(_FILLERS).format(**values).split()
    words = words[:WORDS]
    words[-1] = words[-1].rstrip(".,") + "."
    return " ".join(words)


def first_sentence(text: str) -> str:
    match = re.search(r"[.!?](?=\s|$)", text)
    return text[: match.end()] if match else text


def bot_config(fake_url: str, streaming: bool) -> dict[str, Any]:
    return {
        "backends": [{"id": "paced", "type": "openai", "base_url": fake_url, "max_retries": 0}],
        # A budget no run fills: no compaction request comes between the answers.
        "agents": [
            {
                "id": "paced",
                "name": "Paced",
                "backend": "paced",
                "model": "paced-model",
                "context_tokens": 1_000_000,
            }
        ],
        "default_agent": "paced",
        "streaming": {"enabled": streaming},  # otherwise the shipped settings
        "limits": {"per_user_requests_per_minute": 1_000_000},
    }


async def one_send(user: MatrixUser, room_id: str, n: int) -> float:
    """One homeserver send as a client sees it: from the request to the sync delivering it."""
    started = time.perf_counter()
    event_id = await user.send_text(room_id, f"send {n}")
    await user.wait_until(lambda: event_id in user._room(room_id).arrived, 20, "own message")
    return user._room(room_id).arrived[event_id] - started


async def one_answer(
    user: MatrixUser, fake: Threaded[FakeOpenAI], bot_id: str, room_id: str, i: int, send_s: float
) -> dict[str, Any]:
    expected = answer_text(i)
    fake.call(lambda f: f.stream_log.clear())
    question = await user.send_text(room_id, f"q{i}")

    def answers(e: dict[str, Any]) -> bool:
        marker = e.get("content", {}).get("org.surfaces.turn", {})
        return e.get("sender") == bot_id and not is_edit(e) and marker.get("answers") == question

    def final() -> float | None:
        post = user.find(room_id, answers, after=question)
        if post is None or user.latest_text(room_id, post) != expected:
            return None
        edits = user.edits(room_id, post)
        latest = edits[-1]["content"]["m.new_content"] if edits else post["content"]
        return None if latest["org.surfaces.turn"].get("partial") else 1.0

    await user.wait_until(final, 30, f"the final text of answer {i}")
    post = user.find(room_id, answers, after=question)
    assert post is not None
    arrived = user._room(room_id).arrived
    edits = user.edits(room_id, post)
    request_at = fake.call(lambda f: f.requests[-1]["at"])
    log = _stream_of(fake.call(lambda f: list(f.stream_log)), expected)
    text, sentence_at = "", None
    goal = first_sentence(expected)
    for at, piece in log:
        if piece is None:
            break
        text += piece
        # The word ending the sentence comes with its space: from then on it is known complete.
        if sentence_at is None and (text.startswith(goal + " ") or text == expected):
            sentence_at = at
    end_at = log[-1][0]
    first_at = arrived[post["event_id"]]
    final_at = arrived[edits[-1]["event_id"]] if edits else first_at
    first_body = post["content"]["body"]
    assert sentence_at is not None
    return {
        "first_words_s": log[0][0] - request_at,
        "first_sentence_s": sentence_at - request_at,
        "stream_end_s": end_at - request_at,
        "send_s": send_s,
        "first_text_s": first_at - request_at,
        "complete_s": final_at - request_at,
        "first_text_over_ideal_s": first_at - (sentence_at + send_s),
        "complete_over_ideal_s": final_at - (end_at + send_s),
        "events": 1 + len(edits),
        "edits_per_s": len(edits) / (final_at - first_at) if edits else 0.0,
        "first_post": first_body,
        "first_post_ends_sentence": bool(_SENTENCE_END.search(first_body.rstrip())),
    }


def _stream_of(log: list[tuple[float, str | None]], expected: str) -> list[tuple[float, str | None]]:
    """The pieces of the stream that wrote `expected`, and its end (the log may hold others)."""
    start = 0
    for index, (_, piece) in enumerate(log):
        if piece is None:
            if "".join(p or "" for _, p in log[start:index]) == expected:
                return log[start : index + 1]
            start = index + 1
    raise AssertionError(f"no stream wrote {expected[:40]!r}…")


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [s[key] for s in samples]

    out: dict[str, Any] = {"answers": len(samples)}
    for key in (
        "send_s",
        "first_words_s",
        "first_sentence_s",
        "first_text_s",
        "first_text_over_ideal_s",
        "stream_end_s",
        "complete_s",
        "complete_over_ideal_s",
    ):
        out[f"{key}_median"] = median(col(key))
        out[f"{key}_p95"] = percentile(col(key), 95)
    out["events_mean"] = sum(col("events")) / len(samples)
    out["edits_per_s_mean"] = sum(col("edits_per_s")) / len(samples)
    out["first_post_ends_sentence_share"] = sum(col("first_post_ends_sentence")) / len(samples)
    out["samples"] = samples
    return out


async def run(answers: int, warmup: int, modes: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="surfaces-bench-stream-"))
    synapse = SynapseServer(work / "synapse")
    fake = Threaded(lambda: FakeOpenAI(reply_fn=_reply), name="paced-openai")
    fake.call(lambda f: f.set_mode("normal", first_delay_s=FIRST_WORDS_S, delay_s=WORD_S))
    bot: StandaloneBot | None = None
    user: MatrixUser | None = None
    results: dict[str, Any] = {}
    try:
        await asyncio.to_thread(synapse.start)
        config = bot_config(fake.server.base_url, streaming=modes[0] == "on")
        bot = await asyncio.to_thread(
            lambda: StandaloneBot(synapse, config, data_dir=work / "bot").start(timeout=120)
        )
        user = await make_user(synapse, "bench-streamer")
        [room] = await surfaces_rooms(user, bot, 1)
        scratch = await user.create_room(preset="private_chat")
        n = 0
        for mode in modes:
            if bot_config(fake.server.base_url, mode == "on") != config:
                config = bot_config(fake.server.base_url, mode == "on")
                bot.set_config_overrides(config)
                await asyncio.to_thread(bot.restart, 120)
            print(f"  streaming {mode}: {answers} answers", flush=True)
            samples = []
            for k in range(warmup + answers):
                send_s = await one_send(user, scratch, n)
                sample = await one_answer(user, fake, bot.user_id, room, n, send_s)
                n += 1
                if k >= warmup:
                    samples.append(sample)
            results[mode] = summarize(samples)
    finally:
        if user is not None:
            await user.close()
        if bot is not None:
            await asyncio.to_thread(bot.stop)
        await asyncio.to_thread(synapse.stop)
        fake.close()
        shutil.rmtree(work, ignore_errors=True)
    return results


def _reply(messages: list[dict[str, Any]]) -> str:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    match = re.fullmatch(r"q(\d+)", str(last).strip())
    return answer_text(int(match.group(1))) if match else "Not a benchmark question."


def verdicts(r: dict[str, Any]) -> list[str]:
    checks = [
        (
            "first text within 0.15 s of (first sentence + one send)",
            r["first_text_over_ideal_s_median"],
            r["first_text_over_ideal_s_median"] <= TARGETS["first_text_over_ideal_s"],
        ),
        (
            "first posts ending a sentence ≥ 80%",
            r["first_post_ends_sentence_share"],
            r["first_post_ends_sentence_share"] >= TARGETS["first_post_ends_sentence_share"],
        ),
        (
            "complete within 0.3 s of (stream end + one send)",
            r["complete_over_ideal_s_median"],
            r["complete_over_ideal_s_median"] <= TARGETS["complete_over_ideal_s"],
        ),
        (
            "edits/s ≤ 1 on average",
            r["edits_per_s_mean"],
            r["edits_per_s_mean"] <= TARGETS["edits_per_s"],
        ),
    ]
    return [f"  {what}: {value:.3g} — {'met' if ok else 'MISSED'}" for what, value, ok in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=None, help="answers per mode (40)")
    parser.add_argument("--quick", action="store_true", help="10 answers per mode")
    parser.add_argument("--modes", default="on,off", help="streaming on, off, or both (on,off)")
    args = parser.parse_args()
    answers = args.answers or (10 if args.quick else 40)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        parser.error("--modes takes on, off or on,off")
    results = asyncio.run(run(answers, warmup=2, modes=modes))
    headers = [
        "streaming",
        "one send ms",
        "first sentence s",
        "first text s",
        "first text − ideal s (p95)",
        "first post ends a sentence",
        "stream end s",
        "complete s",
        "complete − ideal s (p95)",
        "events/answer",
        "edits/s",
    ]
    rows = [
        [
            mode,
            r["send_s_median"] * 1000,
            r["first_sentence_s_median"],
            r["first_text_s_median"],
            f"{r['first_text_over_ideal_s_median']:.3f} ({r['first_text_over_ideal_s_p95']:.3f})",
            f"{r['first_post_ends_sentence_share']:.0%}",
            r["stream_end_s_median"],
            r["complete_s_median"],
            f"{r['complete_over_ideal_s_median']:.3f} ({r['complete_over_ideal_s_p95']:.3f})",
            r["events_mean"],
            r["edits_per_s_mean"],
        ]
        for mode, r in results.items()
    ]
    print()
    print(table(headers, rows))
    print("\nMedians over the answers (seconds from the server receiving the request); ideal =")
    print("the server's own timing plus one send measured just before each answer.")
    if "on" in results:
        print("Targets (streaming on):")
        print("\n".join(verdicts(results["on"])))
    name = f"streaming_n{answers}_{'_'.join(modes)}"
    path = write_result(
        name,
        {
            "modes": results,
            "pace": {"first_words_s": FIRST_WORDS_S, "word_s": WORD_S, "words": WORDS},
            "targets": TARGETS,
        },
    )
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
