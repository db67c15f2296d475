"""The `!ai` command tree: parsing, usage lines and error replies.

Handlers stay thin: they validate arguments and call services. A handler signals bad input by
raising `UsageError`; the tree answers with the message and the usage line, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import Refusal, UsageError
from .matrix import GatewayError

if TYPE_CHECKING:
    from .handlers import Request

__all__ = [
    "CommandSpec", "CommandTree", "Refusal", "Replay", "UsageError", "not_run_text", "split_command"
]

Handler = Callable[["Request", str], Awaitable[None]]
Where = Literal["anywhere", "working_room"]
# What a command sent while the bot was down gets after the restart (catch-up): "run" it late
# (it only shows something), "tell" the sender it was not run (its effect depends on when it
# runs, or changes state), or "run_to_show": run it when it has no arguments (then it only
# shows), tell otherwise.
Replay = Literal["run", "tell", "run_to_show"]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    args: str  # usage after the command name, e.g. "[agent] [title…]"
    summary: str
    handler: Handler
    where: Where = "anywhere"
    admin: bool = False
    replay: Replay = "tell"

    def usage(self, prefix: str) -> str:
        return f"!{prefix} {self.name} {self.args}".rstrip()

    def runs_late(self, args: str) -> bool:
        """Run when it arrived while the bot was down (else the sender is told it was not)."""
        return self.replay == "run" or (self.replay == "run_to_show" and not args)


def not_run_text(prefix: str, sub: str, args: str, sent: str) -> str:
    """The one notice for a state-changing command that arrived while the bot was down."""
    shown = f"{sub} {args}".strip().replace("`", "'")
    if len(shown) > 60:
        shown = shown[:59] + "…"
    return (
        f"`!{prefix} {shown}` arrived while I was offline or restarting (sent at {sent}) and "
        "was not run: running it late could do something you no longer want. "
        "Send it again if you still want it."
    )


def split_command(body: str, prefix: str) -> tuple[str, str] | None:
    """`!ai new writer Draft` → ("new", "writer Draft"); None when not a command for us."""
    # Any whitespace separates words, so `!ai system` may be followed by a multi-line prompt.
    words = body.split(maxsplit=2)
    if not words or words[0].lower() != f"!{prefix}".lower():
        return None
    sub = words[1].lower() if len(words) > 1 else ""
    return sub, words[2].strip() if len(words) > 2 else ""


class CommandTree:
    def __init__(self, log: logging.Logger) -> None:
        self._commands: dict[str, CommandSpec] = {}
        self.log = log

    def add(self, spec: CommandSpec) -> None:
        self._commands[spec.name] = spec

    def help_text(self, prefix: str, *, is_admin: bool) -> str:
        lines = ["**Surfaces commands**", ""]
        for spec in self._commands.values():
            if spec.admin and not is_admin:
                continue
            where = " (in a working room)" if spec.where == "working_room" else ""
            admin = " (admins)" if spec.admin else ""
            lines.append(f"- `{spec.usage(prefix)}`: {spec.summary}{where}{admin}")
        lines.append("")
        lines.append("In a working room, plain messages go to the room's agent.")
        return "\n".join(lines)

    async def run(self, request: Request, sub: str, args: str) -> None:
        """Answer the command; one caught up after a restart (`request.late_sent`) is run only if
        its spec says so, after the same checks as live, else its sender is told it was not."""
        prefix = request.settings.command_prefix
        spec = self._commands.get(sub)
        if spec is None:
            names = ", ".join(f"`{name}`" for name in self._commands)
            what = f"Unknown command `{sub}`." if sub else "Which command?"
            await request.reply(f"{what} Valid commands: {names}. Try `!{prefix} help`.")
            return
        if spec.admin and not request.is_admin:
            await request.reply(f"`!{prefix} {spec.name}` is for admins only.")
            return
        if spec.where == "working_room" and await request.working_room() is None:
            await request.reply(
                f"`!{prefix} {spec.name}` works in one of your working rooms. "
                f"Send `!{prefix} rooms` to find them."
            )
            return
        if request.late_sent is not None and not spec.runs_late(args):
            await request.reply(not_run_text(prefix, spec.name, args, request.late_sent))
            return
        try:
            await spec.handler(request, args)
        except UsageError as e:
            await request.reply(f"{e}\nUsage: `{spec.usage(prefix)}`")
        except Refusal as e:
            await request.reply(str(e))
        except GatewayError as e:
            self.log.warning("Command %r by %s: %s", sub, request.sender, e)
            await request.reply(f"Sorry, I could not {e.action}: {e.reason}.")
        except Exception:
            self.log.exception("Command %r failed", sub)
            await request.reply(
                f"Sorry, `!{prefix} {spec.name}` failed unexpectedly. "
                "The operator can find the details in the bot's log."
            )
