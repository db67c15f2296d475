"""Foundation: the plugin answers `!ai help` in standalone maubot and in the full maubot server,
and a config edit through the management API applies without restarting the instance."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from devtools.e2e import MakeUser
from devtools.maubot_server import MaubotServer
from devtools.maubot_standalone import StandaloneBot
from devtools.procs import LogCursor
from devtools.synapse import SynapseServer

pytestmark = pytest.mark.e2e

BASE_KEYS = ("command_prefix", "access", "onboarding", "backends", "agents", "streaming", "limits")


async def test_help_in_standalone(standalone_bot: StandaloneBot, make_user: MakeUser) -> None:
    alice = await make_user()
    room = await alice.open_dm(standalone_bot.user_id)

    asked = await alice.send_text(room, "!ai help")
    notice = await alice.wait_for_notice(room, "help", sender=standalone_bot.user_id, after=asked)

    assert notice["content"]["msgtype"] == "m.notice"


def _wait_saved_config(server: MaubotServer, instance_id: str, timeout: float = 10.0) -> str:
    """The instance's config once the plugin has saved its first version (maubot does it in the
    background after start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.get_instance(instance_id).get("config") or ""
        if "command_prefix" in text:
            return text
        time.sleep(0.1)
    raise TimeoutError(f"instance {instance_id} has no saved config")


async def test_full_server_upload_help_and_live_config(
    synapse: SynapseServer, maubot_server: MaubotServer, surfaces_mbp: Path, make_user: MakeUser
) -> None:
    plugin = maubot_server.upload_plugin(surfaces_mbp)
    assert plugin["id"] == "org.surfaces.bot"
    bot = maubot_server.register_bot()
    maubot_server.create_instance("surfaces", bot, "org.surfaces.bot")
    alice = await make_user()
    room = await alice.open_dm(bot)

    asked = await alice.send_text(room, "!ai help")
    await alice.wait_for_notice(room, "help", sender=bot, after=asked)

    # Edit the config like the web UI does: the saved YAML with one value changed.
    yaml = YAML()
    config = yaml.load(_wait_saved_config(maubot_server, "surfaces"))
    config["command_prefix"] = "bot"
    out = io.StringIO()
    yaml.dump(config, out)
    cursor = LogCursor(maubot_server.log_path)
    maubot_server.set_instance_config("surfaces", out.getvalue())

    asked = await alice.send_text(room, "!bot help")
    await alice.wait_for_notice(room, "help", sender=bot, after=asked, timeout=15)

    assert "Started instance" not in cursor.new_text(), "the config edit restarted the instance"
    saved = YAML(typ="safe").load(maubot_server.get_instance("surfaces")["config"])
    assert saved["command_prefix"] == "bot"
    for key in BASE_KEYS:
        assert key in saved, f"config lost {key!r} after the edit"
