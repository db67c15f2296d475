"""An aiohttp.web app on a free loopback port that notices clients hanging up (fakes build on it)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TypeVar

from aiohttp import web

_Server = TypeVar("_Server", bound="LoopbackServer")
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class LoopbackServer:
    """Subclasses add their routes in `routes`; `base_url` is known once `start` returned."""

    url_path = ""  # appended to http://host:port for `base_url`

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.disconnects = 0
        self.disconnected = asyncio.Event()  # set at every client disconnect seen mid-answer
        self._runner: web.AppRunner | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{self.url_path}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> str:
        # Request bodies as large as providers take (images inline, audio uploads), not 1 MB.
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        self.routes(app)
        # handler_cancellation: a client hanging up cancels the handler, so we can count it.
        # shutdown_timeout: a hanging answer must not hold up stop() for the default minute.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # the bound port, when 0 asked the OS to pick one
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def stop(self) -> None:
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self: _Server) -> _Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def saw_disconnect(self) -> None:
        if not self._stopping:
            self.disconnects += 1
            self.disconnected.set()

    async def serve_until_signalled(self, name: str) -> None:
        """Run as a process: print where we listen, stop at SIGINT/SIGTERM."""
        await self.start()
        print(f"{name} listening on {self.base_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
