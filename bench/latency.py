"""Message latency: a user's message to the bot's final answer, Surfaces vs a bare echo plugin.

Both bots run in standalone maubot on one Synapse in the same run; messages go one at a time,
alternating between a baseline room and a Surfaces working room, so both see the same noise.
Latency = from just before the user's send to the sync that shows the final text
(`echo: <text>`: the reply itself, or with streaming on, the edit that completes it).

The echo backend sleeps 20 ms between words and has no config for it; messages here are one word,
so each Surfaces answer carries exactly one such 20 ms pause (reported, not subtracted).

    .venv/bin/python -m bench.latency [--quick] [--samples 40] [--against REV]

`--against REV` also runs the plugin as it was at git revision REV, as a third bot on the same
Synapse, in the same alternation: the row "× REV" compares this tree with it, sample for sample.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from typing import Any

from bench._bots import Arena, export_revision, final_answer_seen
from bench._common import median, percentile, table, write_result
from devtools.matrix_user import MatrixUser

ECHO_WORD_DELAY_S = 0.02  # surfaces_plugin/backends/echo.py: EchoBackend(delay_s=0.02)
TARGET_RATIO = 1.2


async def one(user: MatrixUser, room_id: str, bot_id: str, text: str) -> float:
    started = time.perf_counter()
    event_id = await user.send_text(room_id, text)
    seen = await user.wait_until(
        final_answer_seen(user, room_id, bot_id, f"echo: {text}", event_id),
        timeout=60,
        what=f"answer to {text}",
    )
    return seen - started


async def series(arena: Arena, samples: int, warmup: int, tag: str) -> dict[str, list[float]]:
    assert arena.user and arena.baseline and arena.surfaces
    bots = [
        ("baseline", arena.baseline_rooms[0], arena.baseline.user_id),
        ("surfaces", arena.surfaces_rooms[0], arena.surfaces.user_id),
    ]
    if arena.previous is not None:
        bots.append(("previous", arena.previous_rooms[0], arena.previous.user_id))
    out: dict[str, list[float]] = {name: [] for name, _, _ in bots}
    for i in range(warmup + samples):
        turn = bots[i % len(bots):] + bots[: i % len(bots)]  # no bot always goes first
        for name, room_id, bot_id in turn:
            seconds = await one(arena.user, room_id, bot_id, f"{tag}{i}")
            if i >= warmup:
                out[name].append(seconds)
    return out


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    base, surf = samples["baseline"], samples["surfaces"]
    previous = samples.get("previous")
    against = {}
    if previous:
        against = {
            "previous_median_ms": median(previous) * 1000,
            "previous_p95_ms": percentile(previous, 95) * 1000,
            "median_ratio_to_previous": median(surf) / median(previous),
            "previous_median_ratio": median(previous) / median(base),
        }
    return {
        **against,
        "baseline_median_ms": median(base) * 1000,
        "baseline_p95_ms": percentile(base, 95) * 1000,
        "surfaces_median_ms": median(surf) * 1000,
        "surfaces_p95_ms": percentile(surf, 95) * 1000,
        "median_ratio": median(surf) / median(base),
        "p95_ratio": percentile(surf, 95) / percentile(base, 95),
        "samples": len(surf),
        "raw_ms": {k: [round(v * 1000, 2) for v in vs] for k, vs in samples.items()},
    }


async def run(samples: int, warmup: int, against: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    previous_root = export_revision(against) if against else None
    try:
        async with Arena(rooms=1, streaming=True, previous_root=previous_root) as arena:
            await _modes(arena, samples, warmup, results)
    finally:
        if previous_root is not None:
            shutil.rmtree(previous_root, ignore_errors=True)
    return results


async def _modes(arena: Arena, samples: int, warmup: int, results: dict[str, Any]) -> None:
    for streaming in (True, False):
        await arena.set_streaming(streaming)
        mode = "streaming on" if streaming else "streaming off"
        print(f"  {mode}: {samples} samples each", flush=True)
        tag = "s" if streaming else "n"
        results[mode] = summarize(await series(arena, samples, warmup, tag))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 samples per mode")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument(
        "--against", metavar="REV", default=None, help="also run the plugin at this git revision"
    )
    args = parser.parse_args()
    samples = args.samples or (15 if args.quick else 40)
    results = asyncio.run(run(samples, warmup=3, against=args.against))
    rows = [
        [
            mode,
            r["baseline_median_ms"],
            r["baseline_p95_ms"],
            r["surfaces_median_ms"],
            r["surfaces_p95_ms"],
            r["median_ratio"],
            r["p95_ratio"],
            r["samples"],
        ]
        for mode, r in results.items()
    ]
    print()
    print(
        table(
            [
                "Surfaces mode",
                "baseline median ms",
                "baseline p95 ms",
                "Surfaces median ms",
                "Surfaces p95 ms",
                "median ×",
                "p95 ×",
                "samples",
            ],
            rows,
        )
    )
    print(
        f"\nTarget: median ≤{TARGET_RATIO}× baseline. Each Surfaces answer includes the echo "
        f"backend's fixed {ECHO_WORD_DELAY_S * 1000:.0f} ms word pause."
    )
    for mode, r in results.items():
        ok = r["median_ratio"] <= TARGET_RATIO
        print(f"  {mode}: {r['median_ratio']:.2f}× — {'met' if ok else 'MISSED'}")
    if args.against:
        print(f"\nThis tree against {args.against}, measured alongside:")
        print(
            table(
                ["Surfaces mode", f"{args.against} median ms", "this tree median ms", f"× {args.against}"],
                [
                    [mode, r["previous_median_ms"], r["surfaces_median_ms"], r["median_ratio_to_previous"]]
                    for mode, r in results.items()
                ],
            )
        )
    path = write_result(
        "latency_against" if args.against else "latency",
        {
            "modes": results,
            "echo_word_delay_s": ECHO_WORD_DELAY_S,
            "target_ratio": TARGET_RATIO,
            "against": args.against,
        },
    )
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
