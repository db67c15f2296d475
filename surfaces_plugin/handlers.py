"""The `!ai` subcommands: thin handlers that check arguments and call the services."""

from __future__ import annotations

from .commands import CommandSpec, CommandTree, Refusal, UsageError
from .context import Request
from .layout import matrix_to

MAX_TITLE_CHARS = 80


async def cmd_help(req: Request, args: str) -> None:
    await req.reply(req.app.commands.help_text(req.settings.command_prefix, is_admin=req.is_admin))


async def cmd_start(req: Request, args: str) -> None:
    await req.reply(await req.app.onboarding.start(req.sender))


def _split_agent_and_title(req: Request, args: str) -> tuple[str, str]:
    first, _, rest = args.partition(" ")
    if first and req.settings.agent(first) is not None:
        return first, rest.strip()
    return req.settings.default_agent, args.strip()


async def cmd_new(req: Request, args: str) -> None:
    agent_id, title = _split_agent_and_title(req, args)
    if len(title) > MAX_TITLE_CHARS:
        raise UsageError(f"That title has {len(title)} characters; the limit is {MAX_TITLE_CHARS}.")
    await req.reply(await req.app.onboarding.new_room(req.sender, agent_id, title))


async def cmd_rooms(req: Request, args: str) -> None:
    rooms = await req.app.chats.rooms_of(req.sender)
    prefix = req.settings.command_prefix
    if not rooms:
        await req.reply(f"You have no working rooms yet. Send `!{prefix} start` to create your Space.")
        return
    lines = [f"**Your working rooms** ({len(rooms)})", ""]
    for room in rooms:
        lines.append(
            f"- [{room.title}]({matrix_to(room.room_id)}) · agent `{room.agent}` · "
            f"last activity {room.last_activity_text()}"
        )
    await req.reply("\n".join(lines))


async def cmd_agents(req: Request, args: str) -> None:
    lines = ["**Agents**", ""]
    for agent in req.settings.agents.values():
        default = " (default)" if agent.id == req.settings.default_agent else ""
        lines.append(f"- `{agent.id}`{default}: **{agent.name}**, {agent.description}".rstrip(", "))
    await req.reply("\n".join(lines))


def _unknown_agent(req: Request, agent_id: str) -> UsageError:
    valid = ", ".join(f"`{a}`" for a in req.settings.agents)
    return UsageError(f"There is no agent `{agent_id}`. Valid agents: {valid}.")


async def cmd_agent(req: Request, args: str) -> None:
    agent_id = args.strip()
    if not agent_id:
        raise UsageError("Which agent?")
    if req.settings.agent(agent_id) is None:
        raise _unknown_agent(req, agent_id)
    room = await req.working_room()
    assert room is not None  # the tree checked `where`
    if room.agent == agent_id:
        await req.reply(f"This room already talks to `{agent_id}`.")
        return
    await req.app.chats.update_binding(room, agent=agent_id)
    await req.reply(f"This room now talks to `{agent_id}`. The conversation so far is kept.")


async def cmd_archive(req: Request, args: str) -> None:
    room = await req.working_room()
    assert room is not None
    await req.app.onboarding.archive(room)
    await req.reply(
        "This room is archived: it left your Space and messages here no longer go to an agent. "
        "Its history stays."
    )


async def cmd_retry(req: Request, args: str) -> None:
    room = await req.working_room()
    assert room is not None
    if not await req.app.dispatcher.retry(room):
        raise Refusal("There is no message in this conversation to answer again.")


async def cmd_cancel(req: Request, args: str) -> None:
    room = await req.working_room()
    assert room is not None
    if not req.app.dispatcher.cancel(room.room_id):
        await req.reply("Nothing is being generated in this room.")


async def cmd_status(req: Request, args: str) -> None:
    await req.reply(await req.app.status_text())


async def cmd_admin(req: Request, args: str) -> None:
    action, _, target = args.partition(" ")
    target = target.strip()
    if action not in ("approve", "block", "unblock") or not target:
        raise UsageError("Say what to do and to whom.")
    if not target.startswith("@") or ":" not in target:
        raise UsageError(f"`{target}` is not a Matrix user id like `@alice:example.org`.")
    await req.app.access.decide(req, action, target)


async def cmd_reconcile(req: Request, args: str) -> None:
    await req.reply("Reconciling with Matrix…")
    report = await req.app.reconciler.run(reason=f"requested by {req.sender}")
    await req.reply(report.to_markdown())


def register_commands(tree: CommandTree) -> None:
    for spec in (
        CommandSpec("help", "", "lists the commands", cmd_help),
        CommandSpec("start", "", "creates your Space and first working room", cmd_start),
        CommandSpec("new", "[agent] [title…]", "a new working room in your Space", cmd_new),
        CommandSpec("rooms", "", "your working rooms with links", cmd_rooms),
        CommandSpec("agents", "", "the agents you can talk to", cmd_agents),
        CommandSpec("agent", "<id>", "switches this room's agent", cmd_agent, "working_room"),
        CommandSpec("retry", "", "answers the last message again", cmd_retry, "working_room"),
        CommandSpec("cancel", "", "stops the answer being generated", cmd_cancel, "working_room"),
        CommandSpec("archive", "", "removes this room from your Space", cmd_archive, "working_room"),
        CommandSpec("status", "", "users, rooms, backends, last reconciliation", cmd_status, admin=True),
        CommandSpec(
            "admin", "approve|block|unblock <@user>", "changes a user's access", cmd_admin, admin=True
        ),
        CommandSpec("reconcile", "", "reconciles with Matrix now", cmd_reconcile, admin=True),
    ):
        tree.add(spec)
