"""Small async client-server helpers for seeding and measuring (plain aiohttp, no plugin code)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any
from urllib.parse import quote

import aiohttp

_txn = itertools.count()


def q(value: str) -> str:
    return quote(value, safe="")


class CS:
    """One access token's view of the client-server API; retries 429 with `retry_after_ms`."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.session = session
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None, decode: bool = True) -> Any:
        for _ in range(20):
            async with self.session.request(
                method, self.base + path, json=body, headers=self.headers
            ) as resp:
                raw = await resp.read()
                if resp.status == 429:
                    retry = json.loads(raw or b"{}").get("retry_after_ms", 500)
                    await asyncio.sleep(retry / 1000)
                    continue
                if resp.status >= 300:
                    raise RuntimeError(f"{method} {path} -> {resp.status}: {raw[:300]!r}")
                return json.loads(raw) if decode else raw
        raise RuntimeError(f"{method} {path}: still rate limited")

    async def joined_rooms(self) -> list[str]:
        return list((await self.call("GET", "/_matrix/client/v3/joined_rooms"))["joined_rooms"])

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        return await self.call("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state")

    async def create_room(self, body: dict[str, Any]) -> str:
        return str((await self.call("POST", "/_matrix/client/v3/createRoom", body))["room_id"])

    async def put_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}"
        return str((await self.call("PUT", path, content))["event_id"])

    async def join(self, room_id: str) -> None:
        await self.call("POST", f"/_matrix/client/v3/join/{q(room_id)}", {})

    async def leave(self, room_id: str) -> None:
        await self.call("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/leave", {})

    @classmethod
    async def login(
        cls, session: aiohttp.ClientSession, base_url: str, user_id: str, password: str
    ) -> CS:
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        anonymous = cls(session, base_url, "")
        answer = await anonymous.call("POST", "/_matrix/client/v3/login", body)
        return cls(session, base_url, str(answer["access_token"]))

    async def send_text(self, room_id: str, text: str) -> str:
        txn = f"bench.{time.time_ns()}.{next(_txn)}"
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{txn}"
        body = {"msgtype": "m.text", "body": text}
        return str((await self.call("PUT", path, body))["event_id"])

    async def default_room_version(self) -> str:
        caps = await self.call("GET", "/_matrix/client/v3/capabilities")
        return str(caps["capabilities"]["m.room_versions"]["default"])


def create_body(request: dict[str, Any], invite: list[str]) -> dict[str, Any]:
    """A layout builder's `create_room` kwargs as the JSON body of POST /createRoom."""
    preset = request["preset"]
    body = {
        "preset": str(getattr(preset, "value", preset)),
        "room_version": request["room_version"],
        "creation_content": request["creation_content"],
        "initial_state": request["initial_state"],
        "power_level_override": request["power_level_override"],
        "invite": invite,
    }
    if request.get("name"):
        body["name"] = request["name"]
    return body


async def bounded(limit: int, coros: list[Any]) -> list[Any]:
    """gather() with at most `limit` running at once."""
    slots = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with slots:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))
