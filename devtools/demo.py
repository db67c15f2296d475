"""Run Surfaces locally: Synapse on loopback, the bot in standalone maubot (SQLite, echo agent),
and a scripted tour as a demo user. `--keep-running` leaves it up for any Matrix client.

Usage (from a checkout): scripts/demo [--keep-running] [--port N]
Everything lives in .demo/ (wiped at each start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from devtools import REPO_ROOT
from devtools.matrix_user import Event, MatrixUser
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"
BOT_LOCALPART = "surfaces"


@dataclass(frozen=True)
class Say:
    """Send text as the demo user in a named room and print the bot's replies (final texts)."""

    text: str
    room: str = "dm"
    note: str = ""


@dataclass(frozen=True)
class JoinInvite:
    """Join the next room the bot invites the user to (optionally of an `org.surfaces.kind`)
    and remember it under `name` for later steps."""

    name: str
    kind: str | None = None
    note: str = ""


Step = Say | JoinInvite

# The tour, step by step as the demo user; add steps as commands land.
TOUR: list[Step] = [
    Say("!ai help", note="Ask the bot what it can do"),
    Say("!ai start", note="Create your Space and its first working room"),
    JoinInvite("space", kind="space", note="Accept the invite to your Space"),
    JoinInvite("general", kind="working", note="Accept the invite to the first working room"),
    Say("Hello, agent!", room="general", note="Talk to the echo agent: no command needed"),
    Say("!ai memory add I prefer short answers", note="A note shared by all your rooms"),
    Say("!ai context", room="general", note="What the next request to the agent holds"),
    Say("!ai rooms", note="List your working rooms"),
]


class Printer:
    """Terminal output, coloured only when stdout is a terminal."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty()

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def title(self, text: str) -> None:
        print(self._c("1", text), flush=True)

    def step(self, text: str) -> None:
        print(f"\n{self._c('1;36', '▶')} {self._c('1', text)}", flush=True)

    def info(self, text: str) -> None:
        print(f"  {self._c('2', text)}", flush=True)

    def said(self, who: str, text: str) -> None:
        label = self._c("1;33", f"{who} ›")
        body = textwrap.indent(text, "    ").lstrip()
        print(f"  {label} {body}", flush=True)

    def error(self, text: str) -> None:
        print(self._c("1;31", text), file=sys.stderr, flush=True)


class Tour:
    """Runs the tour steps as the demo user against the running bot."""

    def __init__(self, user: MatrixUser, bot_mxid: str, out: Printer) -> None:
        self.user = user
        self.bot = bot_mxid
        self.out = out
        self.rooms: dict[str, str] = {}

    async def open_dm(self) -> None:
        self.out.step(f"Open a direct chat with {self.bot}")
        started = time.monotonic()
        self.rooms["dm"] = await self.user.open_dm(self.bot)
        self.out.info(f"the bot joined in {time.monotonic() - started:.1f}s")
        greeting = await self._replies_since(None, quiet=0.7, wait=2.0)
        for event in greeting:
            self.out.said("bot", self.user.latest_text(self.rooms["dm"], event))

    async def run(self, steps: list[Step]) -> None:
        for step in steps:
            if isinstance(step, Say):
                await self._say(step)
            else:
                await self._join(step)

    async def _say(self, step: Say) -> None:
        room = self.rooms[step.room]
        self.out.step(step.note or step.text)
        self.out.said("you", step.text)
        asked = await self.user.send_text(room, step.text)
        try:
            replies = await self.user.collect_replies(room, asked, self.bot, timeout=30, quiet=1.0)
        except TimeoutError:
            self.out.error("  (no answer from the bot within 30s)")
            return
        for event in replies:
            edits = len(self.user.edits(room, event))
            self.out.said("bot", self.user.latest_text(room, event))
            if edits:
                self.out.info(f"(streamed in place: {edits} edit{'s' if edits != 1 else ''})")

    async def _join(self, step: JoinInvite) -> None:
        self.out.step(step.note or f"Join the room the bot invited you to ({step.name})")

        def wanted(room_id: str, state: list[Event]) -> bool:
            if room_id in self.rooms.values():
                return False
            if step.kind is None:
                return True
            create = next((e for e in state if e.get("type") == "m.room.create"), {})
            return bool(create.get("content", {}).get("org.surfaces.kind") == step.kind)

        room_id = await self.user.wait_for_invite(wanted, timeout=30)
        await self.user.join(room_id)
        self.rooms[step.name] = room_id
        self.out.info(f"joined {room_id}")

    async def _replies_since(self, after: str | None, quiet: float, wait: float) -> list[Event]:
        """Bot messages in the DM so far, giving it `wait` seconds to send a first one."""
        room = self.rooms["dm"]
        with contextlib.suppress(TimeoutError):
            await self.user.wait_for(room, lambda e: _from_bot(e, self.bot), wait, after)
            await asyncio.sleep(quiet)
        return self.user.messages(room, self.bot, after)


def _from_bot(event: Event, bot: str) -> bool:
    return event.get("type") == "m.room.message" and event.get("sender") == bot


async def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _print_login(out: Printer, synapse: SynapseServer, bot: StandaloneBot) -> None:
    out.title("\nSurfaces is running. Log in with any Matrix client:")
    print(f"  homeserver  {synapse.url}")
    print(f"  username    {DEMO_USER}   (full id {synapse.user_id(DEMO_USER)})")
    print(f"  password    {DEMO_PASSWORD}")
    print(
        "  Element (web or desktop): Sign in → Homeserver: Edit → "
        f"{synapse.url} → the username and password above."
    )
    print(f"  Then open a direct chat with {bot.user_id} and send: !ai help")
    print(f"  Logs: {synapse.log_path}  and  {bot.log_path}")
    out.title("Press Ctrl-C to stop.")


async def _tour_and_wait(
    synapse: SynapseServer, bot: StandaloneBot, keep_running: bool, tour: list[Step], out: Printer
) -> None:
    token = synapse.register_user(DEMO_USER, DEMO_PASSWORD)
    user = await MatrixUser(synapse.url, synapse.user_id(DEMO_USER), token).start()
    try:
        out.info(f"you are {user.user_id}, the bot is {bot.user_id}")
        runner = Tour(user, bot.user_id, out)
        await runner.open_dm()
        await runner.run(tour)
    finally:
        await user.close()
    if keep_running:
        _print_login(out, synapse, bot)
        await _wait_for_stop()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C, so the children (own sessions) are always stopped."""
    raise KeyboardInterrupt


def run_demo(keep_running: bool, port: int | None, data_dir: Path, tour: list[Step]) -> int:
    """Start everything, run the tour, stop everything (also on Ctrl-C or errors)."""
    signal.signal(signal.SIGTERM, _interrupt)
    out = Printer()
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh homeserver and bot every run
    data_dir.mkdir(parents=True)
    out.title("Surfaces demo")
    started = time.monotonic()
    synapse = SynapseServer(data_dir / "synapse", port=port)
    bot: StandaloneBot | None = None
    try:
        # Start-up is synchronous and outside asyncio, so Ctrl-C interrupts it right away.
        out.info(f"starting Synapse on {synapse.url} …")
        synapse.start()
        out.info("starting the bot (standalone maubot, SQLite, echo agent) …")
        bot = StandaloneBot(
            synapse, localpart=BOT_LOCALPART, data_dir=data_dir / "bot", repo_root=REPO_ROOT
        )
        bot.start()
        out.info(f"ready in {time.monotonic() - started:.1f}s")
        asyncio.run(_tour_and_wait(synapse, bot, keep_running, tour, out))
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # show what failed (exceptions carry log tails), then clean up
        out.error(f"\ndemo failed: {err}")
        return 1
    finally:
        print("\nstopping …", flush=True)
        if bot is not None:
            bot.stop()  # the bot before Synapse: it can hang otherwise
        synapse.stop()


def main(argv: list[str] | None = None, tour: list[Step] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Surfaces locally with a scripted tour.")
    parser.add_argument(
        "--keep-running", action="store_true", help="stay up after the tour (Ctrl-C stops)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="homeserver port (default: a free one)"
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".demo")
    args = parser.parse_args(argv)
    return run_demo(args.keep_running, args.port, args.data_dir.resolve(), tour or TOUR)


if __name__ == "__main__":
    sys.exit(main())
