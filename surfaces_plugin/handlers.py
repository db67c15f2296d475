"""The `!ai` subcommands: thin handlers that check arguments and call the services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mautrix.types import EventID, MessageEvent, RoomID, UserID

from . import layout
from .access import AccessService
from .backends import BackendError, BackendRegistry
from .commands import CommandSpec, CommandTree
from .config import Settings
from .context_builder import ContextBuilder
from .dispatch import Dispatcher
from .e2ee import E2EE
from .errors import Refusal, UsageError
from .export import export_conversation
from .history import History, not_created
from .matrix import MatrixIO
from .memory import MemoryService
from .names import clean_name
from .onboarding import Onboarding
from .reconcile.runner import Reconciler
from .rooms import RoomDirectory, WorkingRoom
from .toolbox import ToolBox
from .txn import txn_id
from .usage import UsageLedger


@dataclass(frozen=True)
class Services:
    """What the commands call; `app.py` builds it."""

    io: MatrixIO
    e2ee: E2EE
    rooms: RoomDirectory
    history: History
    context: ContextBuilder
    memory: MemoryService
    onboarding: Onboarding
    access: AccessService
    dispatcher: Dispatcher
    backends: BackendRegistry
    tools: ToolBox
    reconciler: Reconciler
    usage: UsageLedger
    commands: CommandTree
    status: Callable[[], Awaitable[str]]


@dataclass
class Request:
    """One incoming command: who sent it, where, and how to answer.

    Everything sent for it carries `handled` (its event id, `layout.command_marker`), so
    catch-up after a restart knows it was answered; replies have transaction ids derived from
    it, so one sent again after a crash is one event.
    """

    event: MessageEvent
    services: Services
    settings: Settings
    late_sent: str | None = None  # caught up after a restart: when it was sent, as shown
    _replies: int = field(default=0, init=False)  # numbers the replies' transaction ids

    @property
    def handled(self) -> dict[str, Any]:
        return layout.command_marker(self.event.event_id)

    @property
    def sender(self) -> UserID:
        return self.event.sender

    @property
    def room_id(self) -> RoomID:
        return self.event.room_id

    @property
    def is_admin(self) -> bool:
        return self.settings.access.is_admin(self.sender)

    async def reply(self, text: str) -> EventID:
        self._replies += 1
        txn = txn_id(self.event.event_id, f"command reply {self._replies}")
        return await self.services.io.send_notice(self.room_id, text, self.handled, txn=txn)

    async def working_room(self) -> WorkingRoom | None:
        """The working room this command was sent in, when the sender owns it."""
        room = self.services.rooms.room(self.room_id)
        if room is None or room.owner != self.sender:
            return None
        return room

    async def my_room(self) -> WorkingRoom:
        """For commands the tree only runs in the sender's working room."""
        room = await self.working_room()
        assert room is not None  # the tree checked `where`
        return room


MAX_TITLE_CHARS = 80
MAX_SYSTEM_PROMPT_CHARS = 4000


async def cmd_help(req: Request, args: str) -> None:
    await req.reply(
        req.services.commands.help_text(req.settings.command_prefix, is_admin=req.is_admin)
    )


async def cmd_start(req: Request, args: str) -> None:
    await req.reply(await req.services.onboarding.start(req.sender))


def _split_agent_and_title(req: Request, args: str) -> tuple[str, str]:
    words = args.split(maxsplit=1)
    if words and req.settings.agent(words[0]) is not None:
        return words[0], words[1] if len(words) > 1 else ""
    return req.settings.default_agent, args.strip()


def _title(raw: str) -> str:
    """The room name a `!ai new` title gives, or UsageError; "" means the agent's default."""
    title = clean_name(raw)
    if raw and not title:
        raise UsageError(
            "That title has nothing visible in it (only spaces, invisible or control "
            "characters). Give a title with letters, or none."
        )
    if len(title) > MAX_TITLE_CHARS:  # counted as shown: after cleaning
        raise UsageError(f"That title has {len(title)} characters; the limit is {MAX_TITLE_CHARS}.")
    return title


async def cmd_new(req: Request, args: str) -> None:
    agent_id, raw_title = _split_agent_and_title(req, args)
    title = _title(raw_title)
    await req.reply(await req.services.onboarding.new_room(req.sender, agent_id, title))


async def cmd_rooms(req: Request, args: str) -> None:
    rooms = req.services.rooms.rooms_of(req.sender)
    prefix = req.settings.command_prefix
    if not rooms:
        await req.reply(
            f"You have no working rooms yet. Send `!{prefix} start` to create your Space."
        )
        return
    lines = [f"**Your working rooms** ({len(rooms)})", ""]
    for room in rooms:
        lines.append(
            f"- [{room.title}]({req.services.io.link(room.room_id)}) · agent `{room.agent}` · "
            f"last activity {room.last_activity_text()}"
        )
    await req.reply("\n".join(lines))


async def cmd_agents(req: Request, args: str) -> None:
    lines = ["**Agents**", ""]
    for agent in req.settings.agents.values():
        default = " (default)" if agent.id == req.settings.default_agent else ""
        lines.append(f"- `{agent.id}`{default}: **{agent.name}**, {agent.description}".rstrip(", "))
    await req.reply("\n".join(lines))


async def cmd_tools(req: Request, args: str) -> None:
    room = await req.my_room()
    agent = req.settings.agent_or_default(room.agent)
    if not agent.tools:
        await req.reply(f"The agent `{agent.id}` has no tools.")
        return
    if not req.services.backends.for_agent(agent).features.tools:
        await req.reply(
            f"The agent `{agent.id}` has tools configured, but its backend `{agent.backend}` "
            "cannot call tools."
        )
        return
    lines = await req.services.tools.describe(agent)
    await req.reply("\n".join([f"**Tools of `{agent.id}`**", "", *lines]))


def _unknown_agent(req: Request, agent_id: str) -> UsageError:
    valid = ", ".join(f"`{a}`" for a in req.settings.agents)
    return UsageError(f"There is no agent `{agent_id}`. Valid agents: {valid}.")


async def cmd_agent(req: Request, args: str) -> None:
    agent_id = args.strip()
    if not agent_id:
        raise UsageError("Which agent?")
    if req.settings.agent(agent_id) is None:
        raise _unknown_agent(req, agent_id)
    room = await req.my_room()
    if room.agent == agent_id:
        await req.reply(f"This room already talks to `{agent_id}`.")
        return
    agent = req.settings.agent(agent_id)
    assert agent is not None
    try:
        await req.services.context.switch_agent(room, agent)
    except BackendError as e:
        await req.reply(f"This room still talks to `{room.agent}`: {not_created(agent_id, e)}")
        return
    await req.reply(f"This room now talks to `{agent_id}`. The conversation so far is kept.")


async def cmd_reset(req: Request, args: str) -> None:
    room = await req.my_room()
    # Posts the reset notice itself (it carries the reset marker, and `handled`).
    await req.services.history.reset(room, handled=req.handled)


async def cmd_context(req: Request, args: str) -> None:
    room = await req.my_room()
    report = await req.services.context.report(room)
    w = report.window
    share = round(100 * w.tokens / w.budget) if w.budget else 0
    prefix = req.settings.command_prefix
    prompt = "this room's override" if report.override else f"`{report.agent.id}`'s default"
    if w.summary_used:
        summary = f"yes, it stands for the first {report.summary_covers} messages"
    else:
        summary = "none"
    lines = [
        f"**Context of the next request to `{report.agent.id}`**",
        "",
        f"- messages: {len(w.messages)} ({w.turns_included} turns"
        + (" plus the system message)" if len(w.messages) > w.turns_included else ")"),
        f"- tokens: about {w.tokens} of {w.budget} ({share}%)",
        f"- system prompt: {prompt}",
        f"- summary: {summary}",
        f"- turns left out: {w.turns_omitted}",
        f"- memory notes: {w.memory_notes}",
        f"- stored messages in this conversation: {report.stored_messages}",
    ]
    if report.attachments:
        lines.append(f"- attachments: {len(report.attachments)}")
        lines += [f"  - {label}: about {tokens} tokens" for label, tokens in report.attachments]
    if report.held_by_provider:
        reported = report.provider_prompt_tokens
        lines += [
            "- held by the provider: yes, it keeps this conversation (the tokens above are the "
            "local estimate)",
            "- the provider's last count: "
            + (f"{reported} prompt tokens" if reported else "none reported yet"),
        ]
    if w.turns_omitted:
        lines += ["", f"Older turns do not fit; `!{prefix} compact` summarises them."]
    await req.reply("\n".join(lines))


async def cmd_compact(req: Request, args: str) -> None:
    room = await req.my_room()
    agent = req.services.context.agent_of(room)
    try:
        result = await req.services.context.compact(room, agent)
    except BackendError as e:
        raise Refusal(
            f"Could not compact the conversation: {e.user_message(agent.id, req.settings.command_prefix)}"
        ) from e
    if result is None:
        await req.reply("Nothing to compact yet.")
        return
    await req.reply(
        f"Compacted: {result.summarised} older messages are now summarised (above); "
        f"the latest {result.kept} are sent as they are."
    )


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines() or [""])


async def cmd_system(req: Request, args: str) -> None:
    room = await req.my_room()
    rooms = req.services.rooms
    agent = req.services.context.agent_of(room)
    prefix = req.settings.command_prefix
    if not args:
        if room.system_prompt is not None:
            await req.reply(
                f"This room's system prompt (an override; `!{prefix} system -` goes back to "
                f"`{agent.id}`'s default):\n\n{_quoted(room.system_prompt)}"
            )
        elif agent.system_prompt:
            await req.reply(
                f"This room uses `{agent.id}`'s default system prompt:\n\n"
                f"{_quoted(agent.system_prompt)}"
            )
        else:
            await req.reply(f"This room uses `{agent.id}`'s default, which is empty.")
        return
    if args == "-":
        if room.system_prompt is None:
            await req.reply(f"This room has no override; it already uses `{agent.id}`'s default.")
            return
        await rooms.update_binding(room, system_prompt=None)
        await req.reply(
            f"Override cleared: this room uses `{agent.id}`'s default system prompt again."
        )
        return
    if len(args) > MAX_SYSTEM_PROMPT_CHARS:
        raise UsageError(
            f"That system prompt has {len(args)} characters; the limit is {MAX_SYSTEM_PROMPT_CHARS}."
        )
    await rooms.update_binding(room, system_prompt=args)
    await req.reply(
        f"This room's system prompt is set ({len(args)} characters); it applies from the next "
        f"message. `!{prefix} system -` goes back to `{agent.id}`'s default."
    )


async def cmd_voice(req: Request, args: str) -> None:
    room = await req.my_room()
    prefix = req.settings.command_prefix
    configured = bool(req.settings.speech.voice_backend)
    choice = args.strip().lower()
    if not choice:
        state = "on: answers also come as voice messages" if room.voice else "off"
        missing = "" if configured else " (and no `speech.voice_backend` is configured)"
        await req.reply(
            f"Voice answers are {state} in this room{missing}. `!{prefix} voice on|off` changes it."
        )
        return
    if choice not in ("on", "off"):
        raise UsageError(f"`{args.strip()}` is neither `on` nor `off`.")
    on = choice == "on"
    if on and not configured:
        raise Refusal(
            "Voice answers need text to speech, which is not set up here: an admin needs to set "
            "`speech.voice_backend` in the bot's config."
        )
    if room.voice == on:
        await req.reply(f"Voice answers are already {choice} in this room.")
        return
    await req.services.rooms.update_binding(room, voice=on)
    if on:
        await req.reply(
            "Voice answers are on: from the next answer, each also comes as a voice message. "
            f"`!{prefix} voice off` stops them."
        )
    else:
        await req.reply("Voice answers are off: answers come as text only.")


async def cmd_stream(req: Request, args: str) -> None:
    room = await req.my_room()
    default = req.settings.streaming.enabled
    prefix = req.settings.command_prefix
    choice = args.strip().lower()
    if not choice:
        how = "this room's choice" if room.binding.stream is not None else "the default"
        on = room.streams(default)
        mode = "on: answers appear as they are written" if on else "off: each answer comes whole"
        await req.reply(f"Streaming is {mode} ({how}). `!{prefix} stream on|off` changes it.")
        return
    if choice not in ("on", "off"):
        raise UsageError(f"`{args.strip()}` is neither `on` nor `off`.")
    wanted = choice == "on"
    if room.binding.stream != wanted:
        await req.services.rooms.update_binding(room, stream=wanted)
    await req.reply(
        "Streaming is on here: answers appear as they are written and are edited until done."
        if wanted
        else "Streaming is off here: each answer is sent once, whole."
    )


async def cmd_memory(req: Request, args: str) -> None:
    memory = req.services.memory
    action, _, rest = args.partition(" ")
    rest = rest.strip()
    prefix = req.settings.command_prefix
    if not action:
        notes = await memory.current(req.sender)
        if not notes:
            await req.reply(
                f"You have no shared notes yet. `!{prefix} memory add <text>` adds one; every "
                "working room's agent sees them."
            )
            return
        lines = [f"**Your shared notes** ({len(notes)}, seen by all your working rooms)", ""]
        lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
        await req.reply("\n".join(lines))
        return
    if action == "add":
        number = await memory.add(req.sender, rest)
        await req.reply(f"Noted as {number}. Every one of your working rooms sees it from now on.")
        return
    if action == "forget":
        if not rest:
            raise UsageError("Which note? Give its number.")
        removed = await memory.forget(req.sender, rest)
        await req.reply(f"Forgot note {rest}: {removed}")
        return
    raise UsageError(f"`{action}` is not a memory action; use `add` or `forget`.")


async def cmd_export(req: Request, args: str) -> None:
    room = await req.my_room()
    services = req.services
    exported = await export_conversation(
        services.io, services.e2ee, services.history, services.context, room, req.handled
    )
    if exported == 0:
        raise Refusal("There is nothing to export yet: this conversation has no messages.")


async def cmd_encrypt(req: Request, args: str) -> None:
    room = await req.my_room()
    e2ee = req.services.e2ee
    if not req.services.io.can_encrypt:
        raise Refusal(
            "I cannot encrypt: this bot runs without end-to-end encryption. "
            "Ask the operator to set it up (see the README)."
        )
    if await e2ee.is_encrypted(room.room_id):
        await req.reply("This room is already end-to-end encrypted.")
        return
    await e2ee.encrypt_room(room.room_id)
    await req.reply(
        "This room is now end-to-end encrypted: new messages here can only be read by your "
        "devices and mine. Encryption cannot be turned off again."
    )


async def cmd_archive(req: Request, args: str) -> None:
    room = await req.my_room()
    await req.services.onboarding.archive(room)
    await req.reply(
        "This room is archived: it left your Space and messages here no longer go to an agent. "
        "Its history stays."
    )


async def cmd_retry(req: Request, args: str) -> None:
    room = await req.my_room()
    over = await req.services.usage.over_quota(room, req.sender)
    if over is not None:  # a retry costs tokens like a new message
        raise Refusal(over.text)
    if not await req.services.dispatcher.retry(room, attempt=req.event.event_id):
        raise Refusal("There is no message in this conversation to answer again.")


async def cmd_cancel(req: Request, args: str) -> None:
    room = await req.my_room()
    if not req.services.dispatcher.cancel(room.room_id, by=req.event.event_id):
        await req.reply("Nothing is being generated in this room.")


async def cmd_usage(req: Request, args: str) -> None:
    if args not in ("", "all"):
        raise UsageError(f"`{args}` is not a usage view; give nothing, or `all` (admins).")
    usage = req.services.usage
    if args == "all":
        if not req.is_admin:
            raise Refusal(f"`!{req.settings.command_prefix} usage all` is for admins only.")
        await req.reply(await usage.report_all())
        return
    await req.reply(await usage.report(req.sender))


async def cmd_status(req: Request, args: str) -> None:
    await req.reply(await req.services.status())


async def cmd_admin(req: Request, args: str) -> None:
    action, _, target = args.partition(" ")
    target = target.strip()
    if action not in ("approve", "block", "unblock") or not target:
        raise UsageError("Say what to do and to whom.")
    if not target.startswith("@") or ":" not in target:
        raise UsageError(f"`{target}` is not a Matrix user id like `@alice:example.org`.")
    await req.services.access.decide(req.sender, action, target, reply=req.reply)


async def cmd_reconcile(req: Request, args: str) -> None:
    await req.reply("Reconciling with Matrix…")
    report = await req.services.reconciler.run(reason=f"requested by {req.sender}")
    await req.reply(report.to_markdown())


def register_commands(tree: CommandTree) -> None:
    """Every command, with what it gets when it arrived while the bot was down (`replay`; the
    README's reliability section lists them): shown things run late, changes are told."""
    for spec in (
        CommandSpec("help", "", "lists the commands", cmd_help, replay="run"),
        # Idempotent: a second start only re-invites, so running it late is what was asked.
        CommandSpec("start", "", "creates your Space and first working room", cmd_start, replay="run"),
        CommandSpec("new", "[agent] [title…]", "a new working room in your Space", cmd_new),
        CommandSpec("rooms", "", "your working rooms with links", cmd_rooms, replay="run"),
        CommandSpec("agents", "", "the agents you can talk to", cmd_agents, replay="run"),
        CommandSpec("agent", "<id>", "switches this room's agent", cmd_agent, "working_room"),
        CommandSpec(
            "tools",
            "",
            "the tools this room's agent can call",
            cmd_tools,
            "working_room",
            replay="run",
        ),
        CommandSpec(
            "reset", "", "starts a fresh conversation in this room", cmd_reset, "working_room"
        ),
        CommandSpec(
            "context",
            "",
            "messages and tokens in context vs the budget",
            cmd_context,
            "working_room",
            replay="run",
        ),
        CommandSpec(
            "compact", "", "summarises older history into one message", cmd_compact, "working_room"
        ),
        CommandSpec(
            "system",
            "[text | -]",
            "shows or sets this room's system prompt",
            cmd_system,
            "working_room",
            replay="run_to_show",
        ),
        CommandSpec(
            "stream",
            "[on | off]",
            "shows or sets whether answers here appear as they are written",
            cmd_stream,
            "working_room",
            replay="run_to_show",
        ),
        CommandSpec(
            "memory",
            "[add <text> | forget <n>]",
            "notes shared by all your working rooms",
            cmd_memory,
            replay="run_to_show",
        ),
        CommandSpec("retry", "", "answers the last message again", cmd_retry, "working_room"),
        # Late, nothing is being generated any more (a restart ended it): it says so.
        CommandSpec(
            "cancel", "", "stops the answer being generated", cmd_cancel, "working_room", replay="run"
        ),
        CommandSpec(
            "export",
            "",
            "uploads the conversation as a Markdown file",
            cmd_export,
            "working_room",
            replay="run",
        ),
        CommandSpec(
            "encrypt",
            "",
            "turns on end-to-end encryption here (for good)",
            cmd_encrypt,
            "working_room",
        ),
        CommandSpec(
            "archive", "", "removes this room from your Space", cmd_archive, "working_room"
        ),
        # Late, `on`/`off` are told (they change state); showing it runs.
        CommandSpec(
            "voice",
            "[on | off]",
            "shows or sets whether answers also come as voice messages",
            cmd_voice,
            "working_room",
            replay="run_to_show",
        ),
        CommandSpec(
            "usage", "[all]", "tokens you used (`all`: everyone's, admins)", cmd_usage, replay="run"
        ),
        CommandSpec(
            "status",
            "",
            "users, rooms, backends, last reconciliation",
            cmd_status,
            admin=True,
            replay="run",
        ),
        CommandSpec(
            "admin",
            "approve|block|unblock <@user>",
            "changes a user's access",
            cmd_admin,
            admin=True,
        ),
        # A restart has just reconciled (`!ai status` shows its report).
        CommandSpec("reconcile", "", "reconciles with Matrix now", cmd_reconcile, admin=True),
    ):
        tree.add(spec)
