"""Commands as a user sees them: answers are notices, bad input gets a reason and the usage line."""

from __future__ import annotations

ALICE = "@alice:localhost"


async def test_help_lists_commands_as_a_notice(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai help")
    reply = h.client.messages(dm)[-1]["content"]
    assert reply["msgtype"] == "m.notice"
    for command in ("!ai start", "!ai new [agent] [title…]", "!ai rooms", "!ai agents"):
        assert command in reply["body"]
    assert "!ai reconcile" not in reply["body"]  # admin commands only shown to admins


async def test_unknown_subcommand_lists_the_valid_ones(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai frobnicate")
    reply = h.last_reply(dm)
    assert "Unknown command `frobnicate`" in reply
    assert "`start`" in reply and "`help`" in reply


async def test_other_prefixes_and_plain_dm_text_are_ignored(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!aix help")
    await h.say(dm, ALICE, "hello bot")
    assert h.client.bodies(dm) == []


async def test_working_room_command_elsewhere_says_where_it_works(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai agent echo")
    assert "works in one of your working rooms" in h.last_reply(dm)


async def test_admin_command_refused_for_non_admins(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai status")
    assert h.last_reply(dm) == "`!ai status` is for admins only."


async def test_command_prefix_comes_from_config(make_surfaces) -> None:
    h = await make_surfaces(command_prefix="bot")
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai help")
    assert h.client.bodies(dm) == []
    await h.say(dm, ALICE, "!bot help")
    assert "!bot start" in h.last_reply(dm)


async def test_agents_lists_id_name_and_description(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai agents")
    reply = h.last_reply(dm)
    assert "`echo` (default): **Echo**" in reply
    assert "Needs no network" in reply
