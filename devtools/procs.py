"""Small helpers shared by the process wrappers: free ports, log tails, bounded stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it, so parallel runs don't collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages (empty when the file is missing)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:])


def spawn(
    args: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, output appended to a log file; env replaces os.environ."""
    log_file = log_path.open("ab")
    try:
        # start_new_session: Ctrl-C in a terminal reaches us, not the child, so we stop it in order.
        return subprocess.Popen(
            args,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
        )
    finally:
        log_file.close()  # the child holds its own descriptor


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after a bounded wait (maubot can hang on shutdown)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and reap, for crash tests and stuck shutdowns."""
    if proc is None or proc.poll() is not None:
        return
    proc.kill()
    proc.wait(10)


def wait_until(
    check: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll a cheap synchronous check until it is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class LogCursor:
    """Reads a log file from a remembered offset, so waits only see lines written after a point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_text(self) -> str:
        """Text written since the cursor was made (does not advance)."""
        if not self.path.exists():
            return ""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def count(self, needle: str) -> int:
        return self.new_text().count(needle)


class ServerProcess:
    """What Synapse, standalone maubot and the full maubot server share: a data dir holding the
    process's log and its stdout/stderr, and use as a context manager (start … stop)."""

    data_dir: Path
    log_path: Path

    def start(self, *args: Any, **kwargs: Any) -> Self:
        raise NotImplementedError

    def stop(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stdout_text(self) -> str:
        """What the process wrote to stdout/stderr (tracebacks, prints) outside its log."""
        path = self.data_dir / "stdout.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _tails(self) -> str:
        """The ends of the log and of stdout/stderr, for error messages."""
        return (
            f"--- {self.log_path} ---\n{log_tail(self.log_path)}\n"
            f"--- stdout/stderr ---\n{log_tail(self.data_dir / 'stdout.log')}"
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
