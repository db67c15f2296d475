"""An asyncio server object (a fake provider) served from its own thread and event loop.

Tests drive bots in other processes; a fake in the test's own loop stops answering whenever the
test blocks (a bot's synchronous `start()` waits for the plugin's start-up reconciliation, which
may call the provider), and a module-scoped one must outlive each test's loop. Here the server
runs on a loop of its own:

    with Threaded(lambda: FakeResponses(answer=...)) as fake:
        fake.server.base_url                      # plain attributes can be read at any time
        fake.call(lambda s: s.items(conv_id))     # anything else runs in the server's loop
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class AsyncServer(Protocol):
    def start(self) -> Awaitable[Any]: ...

    def stop(self) -> Awaitable[Any]: ...


S = TypeVar("S", bound=AsyncServer)


class Threaded(Generic[S]):
    """`make()` builds the server inside the thread's loop (its asyncio objects belong there);
    it is started before the constructor returns and stopped by `close()`."""

    def __init__(self, make: Callable[[], S], name: str = "threaded-fake", timeout: float = 10):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

        async def build() -> S:
            server = make()
            await server.start()
            return server

        self.server: S = self._run(build())

    def call(self, fn: Callable[[S], T]) -> T:
        """`fn(server)` run in the server's loop, so it sees a consistent state."""

        async def run() -> T:
            return fn(self.server)

        return self._run(run())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        async def stop() -> None:
            await self.server.stop()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(self.timeout)
        self.loop.close()

    def __enter__(self) -> Threaded[S]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)
