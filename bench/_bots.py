"""The two bots the message benchmarks compare, on one Synapse, and a user talking to them.

- Surfaces: the repo's plugin in standalone maubot (devtools.StandaloneBot), echo agent;
- baseline: a bare maubot plugin written here, which answers every message with
  `echo: <text>` at once (one send, nothing else), run by standalone maubot the same way.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.matrix_user import MatrixUser, is_edit
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer

BASELINE_MODULE = "surfaces_bench_baseline"  # maubot module names are global: keep it unique

_BASELINE_CODE = '''\
"""Benchmark baseline: answers every text message at once with "echo: <text>"."""

from maubot import Plugin
from maubot.handlers import event
from mautrix.types import EventType, MessageEvent, MessageType, TextMessageEventContent


class EchoBaseline(Plugin):
    @event.on(EventType.ROOM_MESSAGE)
    async def on_message(self, evt: MessageEvent) -> None:
        if evt.sender == self.client.mxid or evt.content.msgtype != MessageType.TEXT:
            return
        content = TextMessageEventContent(msgtype=MessageType.TEXT, body=f"echo: {evt.content.body}")
        await self.client.send_message(evt.room_id, content)
'''

_BASELINE_META = f"""\
maubot: 0.1.0
id: org.surfaces.bench.baseline
version: 0.1.0
license: MIT
modules:
  - {BASELINE_MODULE}
main_class: EchoBaseline
database: false
config: false
"""


def write_baseline_plugin() -> Path:
    """A plugin folder in the same shape as the repo (maubot.yaml + base-config.yaml + module)."""
    root = Path(tempfile.mkdtemp(prefix="surfaces-bench-baseline-"))
    (root / "maubot.yaml").write_text(_BASELINE_META)
    (root / "base-config.yaml").write_text("{}\n")
    (root / f"{BASELINE_MODULE}.py").write_text(_BASELINE_CODE)
    return root


def surfaces_overrides(streaming: bool) -> dict[str, Any]:
    """Benchmark config: no per-user limit in the way; streaming on or off."""
    return {
        "streaming": {"enabled": streaming},
        "limits": {"per_user_requests_per_minute": 1_000_000},
    }


async def make_user(synapse: SynapseServer, localpart: str) -> MatrixUser:
    token = await asyncio.to_thread(synapse.register_user, localpart, "password")
    return await MatrixUser(synapse.url, synapse.user_id(localpart), token).start()


async def surfaces_rooms(user: MatrixUser, bot: StandaloneBot, count: int) -> list[str]:
    """`!ai start` then `!ai new` until the user has joined `count` working rooms."""
    dm = await user.open_dm(bot.user_id, timeout=60)
    rooms: list[str] = []
    known = set(user.invites) | user.joined
    for i in range(count):
        text = "!ai start" if i == 0 else f"!ai new Bench room {i}"
        await user.send_text(dm, text)
        # Onboarding invites to the Space and the first room; `new` to one more room.
        fresh: list[str] = await user.wait_until(
            _new_invites(user, known, 2 if i == 0 else 1), timeout=120, what="invites"
        )
        for room_id in fresh:
            known.add(room_id)
            await user.join(room_id)
            state = await user.get_state(room_id)
            is_space = any(
                e["type"] == "m.room.create" and e["content"].get("type") == "m.space"
                for e in state
            )
            if not is_space:
                rooms.append(room_id)
    return rooms


def _new_invites(user: MatrixUser, known: set[str], want: int) -> Callable[[], list[str] | None]:
    def check() -> list[str] | None:
        fresh = [r for r in user.invites if r not in known]
        return fresh if len(fresh) >= want else None

    return check


async def baseline_rooms(user: MatrixUser, bot_id: str, count: int) -> list[str]:
    """Private rooms with the baseline bot invited (it autojoins)."""
    rooms = []
    for _ in range(count):
        room_id = await user.create_room(preset="private_chat", invite=[bot_id])
        await user.wait_for_membership(room_id, bot_id, "join", timeout=60)
        rooms.append(room_id)
    return rooms


def final_answer_seen(
    user: MatrixUser, room_id: str, bot_id: str, expected: str, after: str
) -> Callable[[], float | None]:
    """A check for MatrixUser.wait_until: the bot's message (or its edit) showing `expected`."""

    def check() -> float | None:
        for event in user._after(room_id, after):
            if event.get("sender") != bot_id or event.get("type") != "m.room.message":
                continue
            content = event.get("content", {})
            body = content.get("m.new_content", {}).get("body") if is_edit(event) else None
            if (body if body is not None else content.get("body")) == expected:
                return time.perf_counter()
        return None

    return check


def answers_in_order(user: MatrixUser, room_id: str, bot_id: str, after: str) -> list[str]:
    """The final text of each original bot message after `after`, in timeline order."""
    return [
        user.latest_text(room_id, e)
        for e in user._after(room_id, after)
        if e.get("sender") == bot_id and e.get("type") == "m.room.message" and not is_edit(e)
    ]


def export_revision(revision: str) -> Path:
    """The plugin as it was at a git revision (`git archive`), in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="surfaces-bench-rev-"))
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", revision],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


class Arena:
    """One Synapse with the baseline bot and the Surfaces bot, and one user with rooms in both."""

    def __init__(
        self, rooms: int, streaming: bool = True, previous_root: Path | None = None
    ) -> None:
        self.n_rooms = rooms
        self.streaming = streaming
        # An earlier version of the plugin (a tree from `export_revision`), run alongside.
        self.previous_root = previous_root
        self.previous: StandaloneBot | None = None
        self.previous_rooms: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="surfaces-bench-msg-"))
        self.synapse = SynapseServer(self.work / "synapse")
        self.baseline: StandaloneBot | None = None
        self.surfaces: StandaloneBot | None = None
        self.user: MatrixUser | None = None
        self.baseline_rooms: list[str] = []
        self.surfaces_rooms: list[str] = []
        self.plugin_dir: Path | None = None

    async def __aenter__(self) -> Arena:
        await asyncio.to_thread(self.synapse.start)
        plugin_dir = self.plugin_dir = write_baseline_plugin()
        self.baseline = await asyncio.to_thread(
            lambda: StandaloneBot(
                self.synapse, None, data_dir=self.work / "baseline", repo_root=plugin_dir
            ).start(timeout=120)
        )
        self.surfaces = await asyncio.to_thread(
            lambda: StandaloneBot(
                self.synapse,
                surfaces_overrides(self.streaming),
                data_dir=self.work / "surfaces",
            ).start(timeout=120)
        )
        if self.previous_root is not None:
            root = self.previous_root
            self.previous = await asyncio.to_thread(
                lambda: StandaloneBot(
                    self.synapse,
                    surfaces_overrides(self.streaming),
                    data_dir=self.work / "previous",
                    repo_root=root,
                ).start(timeout=120)
            )
        self.user = await make_user(self.synapse, "bench-alice")
        self.baseline_rooms = await baseline_rooms(self.user, self.baseline.user_id, self.n_rooms)
        self.surfaces_rooms = await surfaces_rooms(self.user, self.surfaces, self.n_rooms)
        if self.previous is not None:
            self.previous_rooms = await surfaces_rooms(self.user, self.previous, self.n_rooms)
        return self

    async def set_streaming(self, streaming: bool) -> None:
        """Restart the Surfaces bots with streaming on or off (their rooms and DB are kept)."""
        assert self.surfaces is not None
        if streaming == self.streaming:
            return
        self.streaming = streaming
        for bot in (self.surfaces, self.previous):
            if bot is not None:
                bot.set_config_overrides(surfaces_overrides(streaming))
                await asyncio.to_thread(bot.restart, 120)

    async def __aexit__(self, *exc: object) -> None:
        if self.user is not None:
            await self.user.close()
        for bot in (self.surfaces, self.previous, self.baseline):
            if bot is not None:
                await asyncio.to_thread(bot.stop)
        await asyncio.to_thread(self.synapse.stop)
        shutil.rmtree(self.work, ignore_errors=True)
        if self.plugin_dir is not None:
            shutil.rmtree(self.plugin_dir, ignore_errors=True)
