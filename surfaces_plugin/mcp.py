"""A small MCP client over the streamable HTTP transport (protocol revision 2025-06-18).

JSON-RPC 2.0, one POST per message; a request's answer comes back as one JSON body or inside an
SSE stream (after any notifications or requests of the server's, which are skipped; a `ping` is
answered). The session id the server gives at `initialize` is sent on every later request; a
404 on it means the session expired, and the client starts a new one once and retries.

Our own rather than the `mcp` SDK: the SDK brings pydantic, anyio, httpx and starlette into
maubot's environment, and its sessions are anyio task groups that must be entered and left in
one task, which does not suit a long-lived plugin. The operator's headers (e.g. Authorization)
are secrets: every message that leaves this module goes through `_redact`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from .backends.http import provider_message
from .backends.sse import SSEDecoder
from .config import McpServerSpec

PROTOCOL_VERSION = "2025-06-18"
CLIENT_INFO = {"name": "surfaces", "version": "0.1.0"}  # as in maubot.yaml
_ACCEPT = "application/json, text/event-stream"
_ERROR_BODY_LIMIT = 4096
_METHOD_NOT_FOUND = -32601


class McpError(Exception):
    """A request to an MCP server failed; the message is short, names the server by its id and
    holds no header value or URL."""


class SessionExpired(McpError):
    """The server answered 404 to `session_id`: it no longer knows that session."""

    def __init__(self, message: str, session_id: str) -> None:
        super().__init__(message)
        self.session_id = session_id


@dataclass(frozen=True)
class McpTool:
    """A tool as the server lists it (`name` is the server's own, not yet made model-safe)."""

    name: str
    description: str
    input_schema: dict[str, Any]


class McpClient:
    """One server's connection state: its session id and the negotiated protocol version.

    Safe to share between tasks: requests run concurrently; (re)initialisation is serialised.
    """

    def __init__(
        self, spec: McpServerSpec, http: aiohttp.ClientSession, log: logging.Logger
    ) -> None:
        self.spec = spec
        self.http = http
        self.log = log
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._protocol = PROTOCOL_VERSION
        self._negotiated = False  # the version header goes on every request after `initialize`
        self._ready = False
        self._init_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # ---- public API

    async def list_tools(self) -> list[McpTool]:
        """Every tool the server offers, following `nextCursor` pages."""
        tools: list[McpTool] = []
        cursor: str | None = None
        for _ in range(100):  # a server that keeps paging forever is cut off
            result = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            for item in result.get("tools") or []:
                tool = _tool(item)
                if tool is not None:
                    tools.append(tool)
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return tools

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The raw `CallToolResult` (`content`, `isError`, `structuredContent`)."""
        return await self.request("tools/call", {"name": name, "arguments": arguments})

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One JSON-RPC request in the session; a session the server forgot is renewed once."""
        await self._ensure_session()
        try:
            return await self._request_once(method, params)
        except SessionExpired as expired:
            self.log.info("MCP server %s: session expired; starting a new one", self.spec.id)
            await self._renew_session(expired.session_id)
            return await self._request_once(method, params)

    async def close(self) -> None:
        """Ends the session on the server (a courtesy: a refusal or failure is ignored)."""
        session, self._session_id, self._ready = self._session_id, None, False
        self._negotiated = False
        for task in list(self._background):
            task.cancel()
        if session is None:
            return
        try:
            async with self.http.delete(
                self.spec.url,
                headers=self._headers(session),
                timeout=aiohttp.ClientTimeout(total=5),
            ):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass

    # ---- session

    async def _ensure_session(self) -> None:
        if self._ready:
            return
        async with self._init_lock:
            if not self._ready:
                await self._initialize()

    async def _renew_session(self, stale: str) -> None:
        async with self._init_lock:
            if self._session_id == stale:  # another task may have renewed it meanwhile
                self._session_id, self._ready, self._negotiated = None, False, False
                await self._initialize()

    async def _initialize(self) -> None:
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": CLIENT_INFO,
        }
        result = await self._request_once("initialize", params, initializing=True)
        version = result.get("protocolVersion")
        if isinstance(version, str) and version:
            self._protocol = version  # the server's counter-offer; sent back on every request
        self._negotiated = True
        await self._notify("notifications/initialized")
        self._ready = True

    # ---- transport

    def _headers(self, session: str | None = None) -> dict[str, str]:
        headers = {**self.spec.headers, "Accept": _ACCEPT}
        session = session or self._session_id
        if self._negotiated or session:
            headers["MCP-Protocol-Version"] = self._protocol
        if session:
            headers["Mcp-Session-Id"] = session
        return headers

    @asynccontextmanager
    async def _post(self, message: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST one message; the response is closed on every way out, cancellation included."""
        sent_session = self._session_id
        try:
            response = await self.http.post(
                self.spec.url,
                json=message,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.spec.timeout_s),
            )
        except aiohttp.ClientConnectorError as e:
            raise self._error(f"cannot connect ({e.os_error.strerror or 'refused'})") from None
        except aiohttp.ServerDisconnectedError:
            raise self._error("the server closed the connection") from None
        except (aiohttp.ClientError, ValueError) as e:
            # The type only: aiohttp's texts carry the URL, which may hold a token.
            raise self._error(type(e).__name__) from None
        complete = False
        try:
            if response.status == 404 and sent_session:
                raise SessionExpired(
                    f"the MCP server `{self.spec.id}` ended the session", sent_session
                )
            if not 200 <= response.status < 300:
                raise await self._status_error(response)
            yield response
            complete = True
        except aiohttp.ClientPayloadError:
            raise self._error("the connection broke mid-answer") from None
        except aiohttp.ClientError as e:
            raise self._error(type(e).__name__) from None
        finally:
            if complete:
                response.release()
            else:
                response.close()  # hang up at once: a cancelled call must not wait for the server

    async def _request_once(
        self, method: str, params: dict[str, Any], *, initializing: bool = False
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        try:
            async with self._post(message) as response:
                if initializing:
                    self._session_id = response.headers.get("Mcp-Session-Id") or None
                reply = await self._read_reply(response, request_id)
        except asyncio.CancelledError:
            if not initializing:
                self._spawn(self._notify_cancelled(request_id))
            raise
        error = reply.get("error")
        if error is not None:
            raise self._error(_rpc_error_text(error))
        result = reply.get("result")
        if not isinstance(result, dict):
            raise self._error(f"`{method}` answered without a result")
        return result

    async def _read_reply(
        self, response: aiohttp.ClientResponse, request_id: int
    ) -> dict[str, Any]:
        if response.content_type == "application/json":
            try:
                data = json.loads(await response.read())
            except ValueError:
                raise self._error("the answer was not valid JSON") from None
            for message in data if isinstance(data, list) else [data]:
                if _is_reply_to(message, request_id):
                    return message
            raise self._error("the answer did not answer our request")
        if response.content_type == "text/event-stream":
            decoder = SSEDecoder()
            async for raw in response.content.iter_any():
                for payload in decoder.feed(raw):
                    reply = await self._on_event(payload, request_id)
                    if reply is not None:
                        return reply
            for payload in decoder.finish():
                reply = await self._on_event(payload, request_id)
                if reply is not None:
                    return reply
            raise self._error("the stream ended before the answer came")
        raise self._error(f"unexpected content type {response.content_type}")

    async def _on_event(self, payload: str, request_id: int) -> dict[str, Any] | None:
        """Our reply, or None after dealing with whatever else the server sent."""
        try:
            message = json.loads(payload)
        except ValueError:
            return None  # an event that is not JSON-RPC (e.g. a priming event) carries nothing
        if _is_reply_to(message, request_id):
            return message
        if isinstance(message, dict) and "method" in message and "id" in message:
            # A server request: we declared no capabilities, so only `ping` has an answer.
            if message["method"] == "ping":
                reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"], "result": {}}
            else:
                reply = {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "error": {"code": _METHOD_NOT_FOUND, "message": "not supported by this client"},
                }
            self._spawn(self._answer_server(reply))
        return None  # notifications (progress, logging) are not shown anywhere

    async def _notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        """A notification or a reply to the server: it answers 202 with no body."""
        async with self._post(message):
            pass

    async def _answer_server(self, reply: dict[str, Any]) -> None:
        try:
            await self._send(reply)
        except McpError as e:
            self.log.debug("MCP server %s: reply to its request not delivered: %s", self.spec.id, e)

    async def _notify_cancelled(self, request_id: int) -> None:
        try:
            await self._notify(
                "notifications/cancelled", {"requestId": request_id, "reason": "cancelled"}
            )
        except McpError as e:
            self.log.debug("MCP server %s: cancel notification not delivered: %s", self.spec.id, e)

    def _spawn(self, coro: Any) -> None:
        """Fire and forget (kept referenced until done, so it is not garbage-collected)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- errors

    async def _status_error(self, response: aiohttp.ClientResponse) -> McpError:
        status = response.status
        if status in (401, 403):
            return self._error(
                f"refused our credentials (HTTP {status}); an admin should check the "
                "server's `headers`"
            )
        body = await response.content.read(_ERROR_BODY_LIMIT)
        said = provider_message(body, response.content_type)
        return self._error(f"HTTP {status}" + (f": {said}" if said else ""))

    def _error(self, detail: str) -> McpError:
        """Every McpError leaves through here, so no header value can be in its text."""
        return McpError(f"the MCP server `{self.spec.id}` failed: {redact(detail, self.spec)}")


def redact(text: str, spec: McpServerSpec) -> str:
    """`text` with every configured header value (and a bearer token alone) replaced by ***."""
    for value in spec.headers.values():
        for secret in (value, value.split()[-1] if value.split() else ""):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
    return text


def _is_reply_to(message: Any, request_id: int) -> bool:
    return (
        isinstance(message, dict)
        and message.get("id") == request_id
        and ("result" in message or "error" in message)
    )


def _rpc_error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return "an unreadable JSON-RPC error"
    message = error.get("message")
    text = " ".join(message.split())[:300] if isinstance(message, str) else "no message"
    return f"JSON-RPC error {error.get('code')}: {text}"


def _tool(item: Any) -> McpTool | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    schema = item.get("inputSchema")
    description = item.get("description")
    return McpTool(
        name=item["name"],
        description=description if isinstance(description, str) else "",
        input_schema=schema if isinstance(schema, dict) else {"type": "object", "properties": {}},
    )
