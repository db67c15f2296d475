"""The gateway: every Matrix call of the plugin goes through here; `MatrixIO` wraps it for services.

mautrix retries only 502/503/504 and connection errors, and never 429; the gateway retries both
with a bounded backoff, bounds concurrency, counts writes (tests and benchmarks read the count),
and turns failures into typed errors that callers can explain to users.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import ClientError
from mautrix.client import Client
from mautrix.errors import (
    MatrixConnectionError,
    MatrixRequestError,
    MForbidden,
    MLimitExceeded,
    MNotFound,
)
from mautrix.types import EventID, EventType, RoomID

from . import layout, replies
from . import txn as txns

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})


class GatewayError(Exception):
    """A Matrix call failed for good; `action` says what was being done, in user terms."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"could not {action}: {reason}")
        self.action = action
        self.reason = reason


class PermissionDenied(GatewayError):
    """The homeserver refused (403): the bot lacks power or membership."""


class NotFound(GatewayError):
    """The room, event or state does not exist (404)."""


class Unavailable(GatewayError):
    """The homeserver stayed unreachable, overloaded or rate limiting after every retry."""


class Gateway:
    def __init__(
        self,
        *,
        concurrency: int = 8,
        max_attempts: int = 6,
        base_delay_s: float = 0.5,
        max_delay_s: float = 20.0,
        log: logging.Logger | None = None,
    ) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.log = log or logging.getLogger("surfaces.matrix")
        self.writes = 0  # Matrix writes performed (state, messages, room creations…)

    async def read(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        return await self._run(action, call)

    async def write(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        result = await self._run(action, call)
        self.writes += 1
        return result

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with jitter; mautrix drops the server's retry_after_ms from errors.
        delay = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return delay * (0.75 + random.random() / 2)

    async def _run(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        last_reason = ""
        for attempt in range(self.max_attempts):
            try:
                async with self._slots:
                    return await call()
            except MLimitExceeded:
                last_reason = "rate limited by the homeserver"
            except MForbidden as e:
                raise PermissionDenied(action, e.message or "forbidden") from e
            except MNotFound as e:
                raise NotFound(action, e.message or "not found") from e
            except MatrixRequestError as e:
                if e.http_status == 429:
                    last_reason = "rate limited by the homeserver"
                elif e.http_status == 403:
                    raise PermissionDenied(action, e.message or "forbidden") from e
                elif e.http_status == 404:
                    raise NotFound(action, e.message or "not found") from e
                elif e.http_status in _TRANSIENT_STATUS:
                    last_reason = f"homeserver error {e.http_status}"
                else:
                    raise GatewayError(action, e.message or f"HTTP {e.http_status}") from e
            except (MatrixConnectionError, ClientError, asyncio.TimeoutError, OSError) as e:
                last_reason = f"homeserver unreachable ({type(e).__name__})"
            if attempt + 1 < self.max_attempts:
                delay = self._delay(attempt)
                self.log.debug("%s: %s; retrying in %.1f s", action, last_reason, delay)
                await asyncio.sleep(delay)
        raise Unavailable(action, last_reason)


class MatrixIO:
    """What services need to act on Matrix: the client behind the gateway, sends, and tasks.

    Background tasks live here too, so an answer or a notice spawned by any service is
    cancelled when the plugin stops and its failure is logged.
    """

    def __init__(self, client: Client, gateway: Gateway, log: logging.Logger) -> None:
        self.client = client
        self.gateway = gateway
        self.log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def bot_id(self) -> str:
        return self.client.mxid

    @property
    def server_name(self) -> str:
        return self.bot_id.split(":", 1)[1]

    @property
    def can_encrypt(self) -> bool:
        """maubot gave this client end-to-end encryption (a device id and its crypto packages)."""
        return self.client.crypto is not None

    def link(self, room_id: str) -> str:
        """A matrix.to link; v12 room ids carry no server, so name ours as `via`."""
        return layout.matrix_to(room_id, via=(self.server_name,))

    # sending

    async def send_notice(
        self,
        room_id: str,
        text: str,
        extra: dict[str, Any] | None = None,
        txn: str | None = None,
    ) -> EventID:
        """A notice; one too large for an event goes as several, cut at natural breaks (the
        first carries `extra` and its id is returned). `txn`: see `send_content`."""
        parts = replies.split_to_fit(text, replies.notice_fits)
        first = await self.send_content(room_id, replies.notice(parts[0], extra), txn)
        for index, part in enumerate(parts[1:], start=1):
            await self.send_content(room_id, replies.notice(part), txns.part(txn, index))
        return first

    async def send_content(
        self, room_id: str, content: dict[str, Any], txn: str | None = None
    ) -> EventID:
        """Send a message; `txn` (from `txn.txn_id`) makes a resend of it one event, else random."""
        # The same txn on every gateway retry: a retried send the server had processed is not doubled.
        return await self.gateway.write(
            "send a message",
            lambda: self.client.send_message_event(
                RoomID(room_id), EventType.ROOM_MESSAGE, content, txn_id=txn
            ),
        )

    async def edit(
        self, room_id: str, event_id: str, new: dict[str, Any], txn: str | None = None
    ) -> EventID:
        return await self.send_content(room_id, replies.edit(event_id, new), txn)

    async def send_state(
        self, action: str, room_id: str, event_type: EventType, content: Any, state_key: str = ""
    ) -> EventID:
        return await self.gateway.write(
            action,
            lambda: self.client.send_state_event(
                RoomID(room_id), event_type, content, state_key=state_key
            ),
        )

    async def set_typing(self, room_id: str, timeout_ms: int) -> None:
        await self.gateway.write(
            "show typing" if timeout_ms else "stop typing",
            lambda: self.client.set_typing(RoomID(room_id), timeout=timeout_ms),
        )

    # background tasks

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """A background task that `cancel_tasks` stops and whose failure is logged."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("Task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def running_tasks(self) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if not t.done()]

    async def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
