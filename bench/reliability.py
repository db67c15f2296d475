"""Reliability artefacts: the long crash-injection run, the load run and the fault runs, recorded.

Runs `tests/e2e/test_reliability.py` through pytest (one process per run, with the knobs as
environment variables) and collects what the tests write to a JSON sidecar
(`SURFACES_RELIABILITY_REPORT`): crash kinds covered with counts, the checks made after each
restart, commands a crash ate, fault-notice times, load timings. Writes
`bench/results/reliability.json`.

    .venv/bin/python -m bench.reliability                          # 54 crash iterations, 50 users
    .venv/bin/python -m bench.reliability --iterations 90 --seed 7
    .venv/bin/python -m bench.reliability --quick                  # 9 iterations, 6 users
    .venv/bin/python -m bench.reliability --only crash
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import BENCH_DIR, table, write_result

REPO_ROOT = BENCH_DIR.parent
TEST_FILE = "tests/e2e/test_reliability.py"

# name → (pytest -k expression, extra environment)
RUNS: dict[str, str] = {
    "crash": "test_crash_at_random_moments_keeps_every_invariant",
    "load": "test_many_users_at_once_all_answered_in_order",
    "faults": "not test_crash_at_random_moments and not test_many_users_at_once",
}
_SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def run_pytest(name: str, env_extra: dict[str, str]) -> dict[str, Any]:
    """One pytest run of TEST_FILE; its outcome, duration and the tests' sidecar report."""
    with tempfile.TemporaryDirectory(prefix="surfaces-rel-") as tmp:
        sidecar = Path(tmp) / "report.json"
        env = {**os.environ, **env_extra, "SURFACES_RELIABILITY_REPORT": str(sidecar)}
        command = [
            sys.executable,
            "-m",
            "pytest",
            TEST_FILE,
            "-k",
            RUNS[name],
            "-p",
            "no:cacheprovider",
            "-q",
            "-s",
            "--timeout",
            "7200",
        ]
        print(
            f"== {name}: {' '.join(f'{k}={v}' for k, v in env_extra.items())} pytest -k "
            f"{RUNS[name]!r}",
            flush=True,
        )
        started = time.monotonic()
        proc = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
        )
        seconds = time.monotonic() - started
        report = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    counts = {kind: int(n) for n, kind in _SUMMARY.findall(tail[0] if tail else "")}
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    result = {
        "passed": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "tests": counts,
        "failures": failures,
        "env": env_extra,
        "report": report,
    }
    if proc.returncode != 0:
        result["output_tail"] = proc.stdout.splitlines()[-60:]
    print(
        f"   {'passed' if result['passed'] else 'FAILED'} in {seconds:.0f} s: {counts}", flush=True
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=None, help="crash iterations (54)")
    parser.add_argument("--seed", type=int, default=1, help="crash seed")
    parser.add_argument("--users", type=int, default=None, help="load users (50)")
    parser.add_argument("--quick", action="store_true", help="9 crash iterations, 6 users")
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these")
    args = parser.parse_args()
    iterations = args.iterations or (9 if args.quick else 54)
    users = args.users or (6 if args.quick else 50)
    envs = {
        "crash": {
            "SURFACES_CRASH_ITERATIONS": str(iterations),
            "SURFACES_CRASH_SEED": str(args.seed),
        },
        "load": {"SURFACES_LOAD_USERS": str(users)},
        "faults": {},
    }
    started = time.monotonic()
    runs = {
        name: run_pytest(name, envs[name]) for name in RUNS if not args.only or name in args.only
    }

    rows = [
        [
            name,
            "pass" if r["passed"] else "FAIL",
            r["seconds"],
            r["tests"].get("passed", 0),
            r["tests"].get("failed", 0) + r["tests"].get("error", 0) + r["tests"].get("errors", 0),
        ]
        for name, r in runs.items()
    ]
    print()
    print(table(["run", "outcome", "seconds", "tests passed", "tests failed"], rows))
    crash = runs.get("crash", {}).get("report", {}).get("crash")
    if crash:
        print()
        print(table(["crash kind", "iterations"], sorted(crash["kinds"].items())))
        print()
        print(table(["check after a restart", "times"], sorted(crash["checks"].items())))
        print(f"\nCommands a crash ate before the bot acted: {crash['commands_lost_to_a_crash']}")
    faults = runs.get("faults", {}).get("report", {}).get("faults")
    if faults:
        print()
        print(table(["backend fault", "s to the notice"], sorted(faults["notice_s"].items())))
    path = write_result(
        "reliability",
        {
            "command": "python -m bench.reliability " + " ".join(sys.argv[1:]),
            "seed": args.seed,
            "crash_iterations": iterations,
            "load_users": users,
            "passed": all(r["passed"] for r in runs.values()),
            "seconds": round(time.monotonic() - started, 1),
            "runs": runs,
        },
    )
    print(f"\nWrote {path}")
    if not all(r["passed"] for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
