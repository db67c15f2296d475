"""The harness itself: a crashed bot, a restarted bot and a restarted Synapse all come back,
and the test client keeps syncing through a homeserver restart."""

from __future__ import annotations

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.synapse import SynapseServer

pytestmark = pytest.mark.e2e


async def test_bot_and_homeserver_restarts(
    synapse: SynapseServer, bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory()
    alice = await make_user()
    room = await alice.open_dm(bot.user_id)

    bot.kill()  # a crash: no clean shutdown
    bot.start()  # returns once the (dropped) first sync is over, woken by the harness
    replies = await alice.command(room, "!ai help", bot.user_id)
    assert any("help" in text for text in replies)

    bot.stop()
    synapse.restart()  # same port and data: tokens stay valid
    bot.start()
    asked = await alice.send_text(room, "!ai help")
    await alice.wait_for_notice(room, "help", sender=bot.user_id, after=asked, timeout=20)
    assert bot.log_text().count("Startup completed") == 3
