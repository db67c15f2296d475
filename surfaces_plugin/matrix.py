"""The gateway: every Matrix call of the plugin goes through here.

mautrix retries only 502/503/504 and connection errors, and never 429; the gateway retries both
with a bounded backoff, bounds concurrency, counts writes (tests and benchmarks read the count),
and turns failures into typed errors that callers can explain to users.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import ClientError
from mautrix.errors import (
    MatrixConnectionError,
    MatrixRequestError,
    MForbidden,
    MLimitExceeded,
    MNotFound,
)

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
        self.reads = 0

    async def read(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        self.reads += 1
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


def content_of(event: Any) -> dict[str, Any]:
    """Plain dict content of a mautrix event or state content object."""
    content = getattr(event, "content", event)
    if hasattr(content, "serialize"):
        return content.serialize()
    return dict(content) if isinstance(content, dict) else {}
