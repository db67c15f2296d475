"""Throughput: 20 rooms × 10 messages sent together; Surfaces vs a bare echo plugin.

One user sends 10 messages into each of 20 rooms (rooms in parallel, each room's messages in
order) and waits for every final answer. Checks that every message is answered exactly once and
that each room's answers come in the order of its messages; reports messages per second.
Rounds alternate baseline and Surfaces on one Synapse in the same run.

    .venv/bin/python -m bench.throughput [--quick] [--rounds 3] [--rooms 20] [--messages 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench._bots import Arena, answers_in_order, final_answer_seen
from bench._common import median, table, write_result
from devtools.matrix_user import MatrixUser

TARGET_RATIO = 0.8


async def burst(
    user: MatrixUser, rooms: list[str], bot_id: str, messages: int, tag: str
) -> dict[str, Any]:
    anchors: dict[str, str] = {}
    started = time.perf_counter()

    async def room_sends(index: int, room_id: str) -> list[str]:
        texts = [f"{tag}r{index}m{j}" for j in range(messages)]
        for j, text in enumerate(texts):
            event_id = await user.send_text(room_id, text)
            if j == 0:
                anchors[room_id] = event_id
        return texts

    sent = await asyncio.gather(*(room_sends(i, r) for i, r in enumerate(rooms)))
    expected = dict(zip(rooms, sent, strict=True))

    def all_final() -> bool:
        return all(
            final_answer_seen(user, r, bot_id, f"echo: {texts[-1]}", anchors[r])() is not None
            and set(answers_in_order(user, r, bot_id, anchors[r])) >= {f"echo: {t}" for t in texts}
            for r, texts in expected.items()
        )

    await user.wait_until(all_final, timeout=600, what="every answer")
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1.0)  # late duplicates, if any, arrive now
    duplicates = out_of_order = 0
    for room_id, texts in expected.items():
        answers = [a for a in answers_in_order(user, room_id, bot_id, anchors[room_id])]
        want = [f"echo: {t}" for t in texts]
        duplicates += len(answers) - len(set(answers))
        out_of_order += answers != want and sorted(set(answers)) == sorted(want)
    total = len(rooms) * messages
    return {
        "messages": total,
        "seconds": elapsed,
        "messages_per_s": total / elapsed,
        "duplicates": duplicates,
        "rooms_out_of_order": out_of_order,
    }


async def run(rounds: int, rooms: int, messages: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    async with Arena(rooms=rooms, streaming=True) as arena:
        assert arena.user and arena.baseline and arena.surfaces
        for streaming in (True, False):
            await arena.set_streaming(streaming)
            mode = "streaming on" if streaming else "streaming off"
            for k in range(rounds):
                for name in ("baseline", "surfaces") if k % 2 == 0 else ("surfaces", "baseline"):
                    bot = arena.baseline if name == "baseline" else arena.surfaces
                    target = arena.baseline_rooms if name == "baseline" else arena.surfaces_rooms
                    tag = f"{mode[10:12]}{k}{name[0]}"
                    r = await burst(arena.user, target, bot.user_id, messages, tag)
                    results.setdefault(f"{mode}/{name}", []).append(r)
                    print(
                        f"  {mode} round {k} {name}: {r['messages_per_s']:.1f} msg/s "
                        f"({r['seconds']:.1f} s, dup {r['duplicates']}, "
                        f"rooms out of order {r['rooms_out_of_order']})",
                        flush=True,
                    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round per mode")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    raw = asyncio.run(run(rounds, args.rooms, args.messages))
    summary: dict[str, Any] = {}
    rows = []
    for mode in ("streaming on", "streaming off"):
        base = median([r["messages_per_s"] for r in raw[f"{mode}/baseline"]])
        surf = median([r["messages_per_s"] for r in raw[f"{mode}/surfaces"]])
        dup = sum(r["duplicates"] for r in raw[f"{mode}/surfaces"])
        ooo = sum(r["rooms_out_of_order"] for r in raw[f"{mode}/surfaces"])
        base_ooo = sum(r["rooms_out_of_order"] for r in raw[f"{mode}/baseline"])
        summary[mode] = {
            "baseline_msg_per_s": base,
            "surfaces_msg_per_s": surf,
            "ratio": surf / base,
            "surfaces_duplicates": dup,
            "surfaces_rooms_out_of_order": ooo,
            "baseline_rooms_out_of_order": base_ooo,
        }
        rows.append([mode, base, surf, surf / base, dup, ooo, base_ooo])
    print()
    print(
        table(
            [
                "Surfaces mode",
                "baseline msg/s",
                "Surfaces msg/s",
                "ratio",
                "Surfaces duplicates",
                "Surfaces rooms out of order",
                "baseline rooms out of order",
            ],
            rows,
        )
    )
    print(f"\nTarget: ≥{TARGET_RATIO}× baseline, every message answered once, per-room order kept.")
    path = write_result(
        "throughput",
        {
            "rooms": args.rooms,
            "messages_per_room": args.messages,
            "rounds": rounds,
            "summary": summary,
            "raw": raw,
            "target_ratio": TARGET_RATIO,
        },
    )
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
