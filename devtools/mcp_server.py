"""A real MCP server for tests and the demo: the reference SDK's `MCPServer` over streamable HTTP.

It runs uvicorn in a thread on a loopback port (`start`/`stop`; `restart` keeps the port and
loses every session, like a redeployed server). With `token`, every request must carry
`Authorization: Bearer <token>`; a wrong one gets a 401 that echoes it back, as careless servers
do, so tests can prove the client never repeats it. Run it alone with
`python -m devtools.mcp_server --port 8765 [--token T]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPDeprecationWarning

NOW_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # what `now` answers for UTC
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")

Scope = dict[str, Any]
# Log notifications are deprecated from protocol 2026-07-28 on; servers of 2025-06-18 send them.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)


def build_server(seen: list[str]) -> MCPServer:
    """The test tools; `seen` records what the slow tool went through (started, cancelled)."""
    server = MCPServer("surfaces-test-tools", log_level="WARNING")

    @server.tool()
    def now(tz: str = "UTC") -> str:
        """The current time. Without `tz`, UTC as 2026-01-31T12:00:00Z; with an IANA zone
        name such as Europe/Berlin, that zone's local time in ISO 8601."""
        if tz == "UTC":
            return datetime.now(timezone.utc).strftime(NOW_FORMAT)
        return datetime.now(ZoneInfo(tz)).isoformat(timespec="seconds")

    @server.tool(name="clock.zones")
    def zones() -> str:
        """Time zone names `now` understands (a name with a dot, as MCP allows)."""
        return ", ".join(ZONES)

    @server.tool()
    def add(a: float, b: float) -> float:
        """Adds two numbers."""
        return a + b

    @server.tool()
    def fail(reason: str = "the tool failed on purpose") -> str:
        """Always fails."""
        raise ToolError(reason)  # a deliberate failure: its text reaches the client

    @server.tool()
    async def slow(seconds: float, ctx: Context) -> str:
        """Waits `seconds`, then says so."""
        # A notification on the call's stream before its result, as busy servers send.
        await ctx.info(f"waiting {seconds:g} s")
        seen.append("slow started")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            seen.append("slow cancelled")
            raise
        return f"waited {seconds:g} s"

    @server.tool()
    def big(chars: int = 50_000) -> str:
        """A long text of `chars` characters."""
        line = "The quick brown fox jumps over the lazy dog. "
        return (line * (chars // len(line) + 1))[:chars]

    @server.tool()
    def secret_admin() -> str:
        """Must never be offered: it is left out of every allow-list."""
        return "admin powers granted"

    return server


class _RequireBearer:
    """ASGI middleware: HTTP requests without the right bearer token get a 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != self.expected:
                body = json.dumps(
                    {"error": "invalid_token", "error_description": f"{given.decode()} is not valid"}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class McpTestServer:
    def __init__(
        self,
        *,
        token: str | None = None,
        json_response: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.json_response = json_response  # answer with one JSON body instead of an SSE stream
        self.host = host
        self.port = port
        self.seen: list[str] = []  # appended from the server's thread; list.append is atomic
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/mcp"

    def start(self, timeout: float = 20) -> str:
        app = build_server(self.seen).streamable_http_app(
            json_response=self.json_response, host=self.host
        )
        asgi: Any = _RequireBearer(app, self.token) if self.token else app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="mcp-test-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the MCP test server did not start on {self.url}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def restart(self) -> None:
        """Same port, fresh process state: every session the clients hold is gone (404)."""
        self.stop()
        self.start()

    def __enter__(self) -> McpTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    server = McpTestServer(token=args.token, port=args.port)
    print(server.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
