"""What must hold in Matrix whatever happened to the bot: read with the bot's own token.

Used by the reliability and security tests. Everything here reads the homeserver (the truth),
never the plugin database.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from devtools.matrix_user import Event, MatrixUser, create_content
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer

NS = "org.surfaces"
TURN = f"{NS}.turn"


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


async def wait_invite_of_kind(user: MatrixUser, kind: str, timeout: float = 15.0) -> str:
    return await user.wait_for_invite(
        lambda _rid, state: create_content(state).get(f"{NS}.kind") == kind, timeout=timeout
    )


async def join_all_invites(user: MatrixUser) -> None:
    """Accept every pending invite (after a crash some may be new)."""
    for room_id in list(user.invites):
        try:
            await user.join(room_id)
        except Exception:  # an invite to a room that is gone: nothing to accept
            pass


async def onboard(
    user: MatrixUser, bot: StandaloneBot, timeout: float = 20.0
) -> tuple[str, str, str]:
    """DM the bot, `!ai start`, accept both invites: (dm, space id, first working room id)."""
    dm = await user.open_dm(bot.user_id)
    await user.wait_for_notice(dm, "Hi!", sender=bot.user_id, timeout=timeout)
    sent = await user.send_text(dm, "!ai start")
    await user.wait_for_notice(dm, "Space is ready", bot.user_id, timeout, after=sent)
    space_id = await wait_invite_of_kind(user, "space", timeout)
    room_id = await wait_invite_of_kind(user, "working", timeout)
    await user.join(space_id)
    await user.join(room_id)
    return dm, space_id, room_id


class BotView:
    """Reads Matrix as the bot does (its token survives restarts): rooms, state, timelines."""

    def __init__(self, synapse: SynapseServer, bot: StandaloneBot) -> None:
        self.synapse = synapse
        self.bot_id = bot.user_id
        self.token = bot.access_token

    async def get(self, path: str) -> Any:
        status, data = await asyncio.to_thread(self.synapse.request, "GET", path, None, self.token)
        if status >= 300:
            raise AssertionError(f"GET {path} -> {status}: {data}")
        return data

    async def joined_rooms(self) -> list[str]:
        return list((await self.get("/_matrix/client/v3/joined_rooms"))["joined_rooms"])

    async def state(self, room_id: str) -> list[Event]:
        return list(await self.get(f"/_matrix/client/v3/rooms/{q(room_id)}/state"))

    async def timeline(self, room_id: str, limit: int = 1000) -> list[Event]:
        """The room's events, oldest first."""
        events: list[Event] = []
        token = None
        while len(events) < limit:
            path = f"/_matrix/client/v3/rooms/{q(room_id)}/messages?dir=b&limit=100"
            if token:
                path += f"&from={q(token)}"
            page = await self.get(path)
            events += page.get("chunk") or []
            token = page.get("end")
            if not page.get("chunk") or not token:
                break
        events.reverse()
        return events


@dataclass
class Layout:
    spaces: dict[str, list[str]] = field(default_factory=dict)  # owner → space ids
    working: dict[str, dict[str, Any]] = field(default_factory=dict)  # room → binding
    owners: dict[str, str] = field(default_factory=dict)  # working room → owner
    archived: dict[str, dict[str, Any]] = field(default_factory=dict)  # archived room → binding
    problems: list[str] = field(default_factory=list)


def _by_key(state: list[Event]) -> dict[tuple[str, str], Event]:
    return {(e["type"], e.get("state_key", "")): e for e in state}


async def read_layout(view: BotView, agents: Collection[str] = ()) -> Layout:
    """Check the structural invariants over every room the bot is in (and, given the configured
    agent ids, that every binding names one of them)."""
    layout = Layout()
    states: dict[str, dict[tuple[str, str], Event]] = {}
    for room_id in await view.joined_rooms():
        states[room_id] = _by_key(await view.state(room_id))
    for room_id, state in states.items():
        create = state.get(("m.room.create", ""), {}).get("content", {})
        kind, owner = create.get(f"{NS}.kind"), create.get(f"{NS}.owner")
        if ("m.room.tombstone", "") in state:
            continue
        if kind == "space":
            layout.spaces.setdefault(owner, []).append(room_id)
        elif kind == "working":
            binding_event = state.get((f"{NS}.binding", ""))
            binding = binding_event.get("content", {}) if binding_event else {}
            if binding.get("archived"):
                layout.archived[room_id] = binding
                continue
            layout.working[room_id] = binding
            layout.owners[room_id] = owner
    for owner, spaces in layout.spaces.items():
        if len(spaces) != 1:
            layout.problems.append(f"{owner} has {len(spaces)} Spaces: {spaces}")
    for room_id, binding in layout.working.items():
        owner = layout.owners[room_id]
        if not binding.get("platform_chat_id"):
            layout.problems.append(f"{room_id}: binding without platform_chat_id: {binding}")
        if agents and binding.get("agent") not in agents:
            layout.problems.append(f"{room_id}: binding names an unknown agent: {binding}")
        space_id = binding.get("space_id")
        if space_id not in layout.spaces.get(owner, []):
            layout.problems.append(f"{room_id}: binding names {space_id}, not {owner}'s Space")
            continue
        child = states[space_id].get(("m.space.child", room_id), {}).get("content", {})
        if not child.get("via"):
            layout.problems.append(f"{room_id}: no m.space.child in its Space {space_id}")
        parent = states[room_id].get(("m.space.parent", space_id), {}).get("content", {})
        if not parent.get("via"):
            layout.problems.append(f"{room_id}: no m.space.parent pointing to {space_id}")
    for space_ids in layout.spaces.values():
        for space_id in space_ids:
            for (etype, key), event in states[space_id].items():
                if etype == "m.space.child" and event.get("content", {}).get("via"):
                    if key in layout.archived:
                        layout.problems.append(f"{space_id}: archived room {key} still linked")
                    elif key not in layout.working:
                        layout.problems.append(f"{space_id}: child {key} is no working room")
    return layout


def is_edit(event: Event) -> bool:
    rel = event.get("content", {}).get("m.relates_to") or {}
    return rel.get("rel_type") == "m.replace"


def latest_content(events: list[Event], event: Event) -> dict[str, Any]:
    """The content a client shows for `event` after its sender's edits (oldest-first events)."""
    content = dict(event.get("content", {}))
    for other in events:
        rel = other.get("content", {}).get("m.relates_to") or {}
        if (
            rel.get("rel_type") == "m.replace"
            and rel.get("event_id") == event.get("event_id")
            and other.get("sender") == event.get("sender")
        ):
            content = dict(other["content"].get("m.new_content", content))
    return content


@dataclass
class Answers:
    unanswered: list[str] = field(default_factory=list)  # user message bodies
    twice: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # answers left cut off, unmarked
    answered: int = 0
    order_ok: bool = True


def check_answers(events: list[Event], owner: str, bot_id: str, prefix: str = "ai") -> Answers:
    """Every owner message (not a command) has exactly one finished answer, in order."""
    result = Answers()
    answers: dict[str, list[Event]] = {}
    answered_order: list[str] = []
    for event in events:
        content = event.get("content", {})
        marker = content.get(TURN)
        if event.get("sender") == bot_id and isinstance(marker, dict) and not is_edit(event):
            target = marker.get("answers")
            answers.setdefault(target, []).append(event)
            answered_order.append(target)
    asked: list[str] = []
    for event in events:
        content = event.get("content", {})
        body = content.get("body")
        if (
            event.get("type") == "m.room.message"
            and event.get("sender") == owner
            and content.get("msgtype") in ("m.text", "m.emote")
            and isinstance(body, str)
            and not is_edit(event)
            and not body.startswith(f"!{prefix}")
        ):
            asked.append(event["event_id"])
            got = answers.get(event["event_id"], [])
            if not got:
                result.unanswered.append(body[:60])
            elif len(got) > 1:
                result.twice.append(body[:60])
            else:
                result.answered += 1
            for answer in got:
                marker = latest_content(events, answer).get(TURN, {})
                if marker.get("partial"):
                    result.partial.append(body[:60])
    first_answers = [a for i, a in enumerate(answered_order) if a not in answered_order[:i]]
    result.order_ok = [a for a in first_answers if a in asked] == [a for a in asked if a in answers]
    return result


async def wait_all_answered(
    view: BotView, room_id: str, owner: str, timeout: float = 30.0
) -> Answers:
    """Poll the timeline until every owner message is answered (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check_answers(await view.timeline(room_id), owner, view.bot_id)
        done = not result.unanswered and not result.partial
        if done or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.3)
