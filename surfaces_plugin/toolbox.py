"""The tool catalogue: which MCP tools an agent may call, under which names, and running them.

The dispatcher asks `tools_for(agent)` before a request and `call(agent, call)` for each tool
call the model makes; `call` never raises (but for cancellation): every failure becomes a
`ToolResult(is_error=True)` whose text tells the model what went wrong. Tool lists are fetched
once per server and kept until the config changes or the server fails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .backends.base import ToolCall, ToolSpec
from .config import AgentSpec, McpServerSpec, Settings
from .http_session import LazySession
from .mcp import McpClient, McpError, McpTool

MAX_RESULT_CHARS = 16_000  # what one tool result may add to the conversation
DOWN_RETRY_S = 30.0  # an unreachable server is asked again after this long, not on every turn
_MAX_NAME = 64
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model for one tool call."""

    text: str
    is_error: bool


@dataclass(frozen=True)
class OfferedTool:
    """A tool as offered to one agent: `name` is model-safe; `tool.name` is the server's."""

    name: str
    server: str
    tool: McpTool

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.tool.description, self.tool.input_schema)


def model_names(tools: list[tuple[str, str]]) -> list[str]:
    """Names the model may see (`^[a-zA-Z0-9_-]{1,64}$`, unique) for (server id, MCP name)
    pairs, in order. A safe name is kept; other characters become `_`; names that clash
    between servers are prefixed with their server id (and numbered if they still clash)."""
    safe = [_UNSAFE.sub("_", name)[:_MAX_NAME] or "tool" for _, name in tools]
    clashes = Counter(safe)
    names: list[str] = []
    taken: set[str] = set()
    for (server, _), name in zip(tools, safe, strict=True):
        if clashes[name] > 1:
            name = _UNSAFE.sub("_", f"{server}_{name}")[:_MAX_NAME]
        candidate, n = name, 2
        while candidate in taken:
            suffix = f"_{n}"
            candidate, n = name[: _MAX_NAME - len(suffix)] + suffix, n + 1
        taken.add(candidate)
        names.append(candidate)
    return names


def tool_result(raw: dict[str, Any], cap: int = MAX_RESULT_CHARS) -> ToolResult:
    """An MCP `CallToolResult` as text for the model: text content joined, other content
    summarised, structured content as JSON when there is nothing else, cut at `cap`."""
    content = raw.get("content")
    parts = [_content_text(item) for item in content] if isinstance(content, list) else []
    text = "\n".join(part for part in parts if part)
    structured = raw.get("structuredContent")
    if not text and structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    is_error = raw.get("isError") is True
    if not text:
        text = "(the tool failed without saying why)" if is_error else "(the tool returned nothing)"
    return ToolResult(truncate(text, cap), is_error)


def truncate(text: str, cap: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= cap:
        return text
    return (
        text[:cap] + f"\n[truncated: the tool returned {len(text):,} characters; "
        f"only the first {cap:,} are shown]"
    )


def _content_text(item: Any) -> str:
    if not isinstance(item, dict):
        return ""
    kind = item.get("type")
    if kind == "text":
        return str(item.get("text") or "")
    if kind in ("image", "audio"):
        return f"[{kind}: {item.get('mimeType') or 'unknown type'}, {_size(item.get('data'))}]"
    if kind == "resource_link":
        return f"[resource link: {item.get('name') or ''} {item.get('uri') or ''}]".replace("  ", " ")
    if kind == "resource":
        resource = item.get("resource") if isinstance(item.get("resource"), dict) else {}
        if isinstance(resource.get("text"), str):
            return resource["text"]
        mime = resource.get("mimeType") or "unknown type"
        return f"[resource: {resource.get('uri') or ''}, {mime}, {_size(resource.get('blob'))}]"
    return f"[{kind} content]"


def _size(data: Any) -> str:
    """The decoded size of base64 `data`, for a summary like "12 KB"."""
    try:
        size = len(base64.b64decode(data, validate=False)) if isinstance(data, str) else 0
    except (binascii.Error, ValueError):
        size = 0
    return f"{size / 1024:.0f} KB" if size >= 1024 else f"{size} bytes"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass
class _Server:
    """One configured server: its client, its tool list when known, and its last failure."""

    spec: McpServerSpec
    client: McpClient
    tools: list[McpTool] | None = None
    error: str = ""  # the last listing failure, already free of secrets
    retry_at: float = 0.0  # monotonic time before which a failed server is not asked again
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ToolBox:
    def __init__(
        self,
        settings: Callable[[], Settings],
        log: logging.Logger,
        http: aiohttp.ClientSession | None = None,
        *,
        down_retry_s: float = DOWN_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.log = log
        self.down_retry_s = down_retry_s
        self.clock = clock
        self._http = LazySession(http)
        self._servers: dict[str, _Server] = {}
        self._retired: list[McpClient] = []

    # ---- what the dispatcher and `!ai tools` call

    async def tools_for(self, agent: AgentSpec) -> list[ToolSpec]:
        """The allowed tools of the agent's servers; unreachable servers are left out."""
        offered, _ = await self._offer(agent)
        return [tool.spec() for tool in offered]

    async def call(self, agent: AgentSpec, call: ToolCall) -> ToolResult:
        """Runs one tool call; every failure comes back as an error result for the model."""
        offered, _ = await self._offer(agent)
        chosen = next((tool for tool in offered if tool.name == call.name), None)
        if chosen is None:
            names = ", ".join(tool.name for tool in offered) or "none"
            return ToolResult(f"There is no tool `{call.name}` here (tools: {names}).", True)
        server = self._servers[chosen.server]
        limit = server.spec.timeout_s
        try:
            async with asyncio.timeout(limit):
                raw = await server.client.call_tool(chosen.tool.name, call.arguments)
        except TimeoutError:
            self.log.info("Tool %s on MCP server %s timed out", chosen.tool.name, chosen.server)
            return ToolResult(f"The tool `{call.name}` timed out after {limit:g} s.", True)
        except McpError as e:
            self.log.warning("Tool %s: %s", chosen.tool.name, e)
            server.tools = None  # listed again next time: the server may have changed or gone
            return ToolResult(f"The tool `{call.name}` could not run: {e}.", True)
        except Exception:  # a bug of ours must not end the answer; the log has the details
            self.log.exception("Tool %s on MCP server %s failed", chosen.tool.name, chosen.server)
            return ToolResult(f"The tool `{call.name}` failed unexpectedly.", True)
        return tool_result(raw)

    async def describe(self, agent: AgentSpec) -> list[str]:
        """Lines for `!ai tools`: each tool with its server and what it does, then problems."""
        offered, errors = await self._offer(agent)
        lines = [
            f"- `{tool.name}` ({tool.server}): {_first_line(tool.tool.description) or 'no description'}"
            for tool in offered
        ]
        for server_id in agent.tools:
            listed = self._servers[server_id].tools if server_id in self._servers else None
            if server_id in errors:
                lines.append(f"- ⚠ {errors[server_id]}; its tools are left out for now")
            elif listed is not None:
                names = {tool.name for tool in listed}
                missing = [name for name in self._spec(server_id).allow if name not in names]
                if missing:
                    lines.append(
                        f"- ⚠ `{server_id}` does not offer "
                        + ", ".join(f"`{name}`" for name in missing)
                    )
        return lines

    # ---- config and lifecycle

    def apply(self, settings: Settings) -> None:
        """Config changed: servers whose spec changed or went are dropped (listed again)."""
        for server_id, server in list(self._servers.items()):
            if settings.mcp_servers.get(server_id) != server.spec:
                del self._servers[server_id]
                self._retired.append(server.client)

    async def close(self) -> None:
        clients = [server.client for server in self._servers.values()] + self._retired
        self._servers, self._retired = {}, []
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await self._http.close()

    # ---- catalogue

    def _spec(self, server_id: str) -> McpServerSpec:
        return self.settings().mcp_servers[server_id]

    def _server(self, server_id: str) -> _Server | None:
        spec = self.settings().mcp_servers.get(server_id)
        if spec is None:
            return None  # validation keeps agents' tools within mcp_servers; a race leaves it out
        server = self._servers.get(server_id)
        if server is None or server.spec != spec:
            if server is not None:
                self._retired.append(server.client)
            server = self._servers[server_id] = _Server(
                spec, McpClient(spec, self._http.get(), self.log.getChild(server_id))
            )
        return server

    async def _offer(self, agent: AgentSpec) -> tuple[list[OfferedTool], dict[str, str]]:
        """The agent's tools under model-safe names, and the servers that failed (by id)."""
        servers = [s for s in (self._server(server_id) for server_id in agent.tools) if s]
        listings = await asyncio.gather(*(self._listing(server) for server in servers))
        pairs: list[tuple[str, McpTool]] = []
        errors: dict[str, str] = {}
        for server, tools in zip(servers, listings, strict=True):
            if tools is None:
                errors[server.spec.id] = server.error
                continue
            allow = set(server.spec.allow)
            pairs += [(server.spec.id, tool) for tool in tools if tool.name in allow]
        names = model_names([(server_id, tool.name) for server_id, tool in pairs])
        offered = [
            OfferedTool(name, server_id, tool)
            for name, (server_id, tool) in zip(names, pairs, strict=True)
        ]
        return offered, errors

    async def _listing(self, server: _Server) -> list[McpTool] | None:
        """The server's tools (cached), or None while it cannot be reached."""
        async with server.lock:  # rooms asking at once share one listing
            if server.tools is not None:
                return server.tools
            if self.clock() < server.retry_at:
                return None
            try:
                async with asyncio.timeout(server.spec.timeout_s):
                    tools = await server.client.list_tools()
            except TimeoutError:
                self._failed(server, f"the MCP server `{server.spec.id}` did not answer within "
                             f"{server.spec.timeout_s:g} s")
                return None
            except McpError as e:
                self._failed(server, str(e))
                return None
            if server.error:
                self.log.info("MCP server %s is reachable again", server.spec.id)
            server.tools, server.error = tools, ""
            return tools

    def _failed(self, server: _Server, error: str) -> None:
        if error != server.error:  # logged once, not on every turn that finds it still down
            self.log.warning("Leaving out the tools of MCP server %s: %s", server.spec.id, error)
        server.error = error
        server.retry_at = self.clock() + self.down_retry_s

