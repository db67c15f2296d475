"""A real local Anthropic Messages API server for tests and demos, with switchable misbehaviour.

In-process:   async with FakeAnthropic() as fake: fake.base_url … fake.set_mode("overloaded", times=1)
              fake.script(Turn(tool_uses=[("get_weather", {"city": "Paris"})]), Turn(text="Sunny"))
Subprocess:   python -m devtools.fake_anthropic --port 0   (prints "fake_anthropic listening on <url>")
              POST /_control {"mode": "overloaded"}  ·  GET /_requests  ·  DELETE /_requests

It streams the API's real event shapes (message_start, ping, content_block_start/delta/stop with
text_delta, thinking_delta, signature_delta and input_json_delta, message_delta, message_stop),
and refuses with a 400 invalid_request_error what the real API refuses: a missing
anthropic-version header or max_tokens, roles not alternating or not starting with user, empty
text blocks, tool results that answer no tool use of the previous message, tool uses left
unanswered, tools without an input_schema, temperature above 1, image blocks outside user
messages or whose base64 source is not a readable PNG, JPEG, GIF or WebP of the media_type it
declares. The default reply says what it saw, e.g. "Fake Claude says: <text> I see an image
(image/png, 75 bytes, 4x3).".

Modes: normal, thinking (a thinking and a redacted_thinking block before the text), hang (no
headers ever), hang_mid (stalls after two text pieces), status (an HTTP error with Anthropic's
error body), overloaded (529 overloaded_error), rate_limit (429 + retry-after), error_event (an
`error` event inside the 200 stream, at text piece `error_at`), cut (connection dropped
mid-text), truncate (the stream ends cleanly but without message_stop), max_tokens (the cap is
hit half-way through the first tool input, whose JSON is left unfinished).
Options (set_mode keywords or /_control keys): reply, status, error_type, message, retry_after,
times, delay_s, chunk_chars, error_at, cache_read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from devtools.images import SUPPORTED_TYPES, check_image, decode_base64, describe_image, sniff_type
from devtools.loopback import LoopbackServer

MODES = (
    "normal",
    "thinking",
    "hang",
    "hang_mid",
    "status",
    "overloaded",
    "rate_limit",
    "error_event",
    "cut",
    "truncate",
    "max_tokens",
)
THINKING = "The user wants a short answer. I will give one."
IMAGE_TOKENS = 1600  # width*height/750 for the largest image the real API takes unscaled
API_VERSION = "2023-06-01"
# Anthropic's error `type` for each HTTP status it uses.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

ReplyFn = Callable[[list[dict[str, Any]]], str]


def default_reply(messages: list[dict[str, Any]]) -> str:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    seen = "".join(f" {describe_image(*image)}." for image in _images(last.get("content")))
    return f"Fake Claude says: {_plain_text(last.get('content', ''))}{seen}"


def _images(content: Any) -> list[tuple[str, bytes]]:
    """(media type, bytes) of a (checked) message's image blocks."""
    if not isinstance(content, list):
        return []
    return [
        (b["source"]["media_type"], decode_base64(b["source"]["data"]))
        for b in content
        if isinstance(b, dict) and b.get("type") == "image"
    ]


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text")


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


@dataclass
class Turn:
    """One scripted answer: optional thinking, text (None: the reply function's), tool uses."""

    text: str | None = None
    thinking: str = ""
    tool_uses: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Behaviour:
    mode: str = "normal"
    reply: str | None = None  # fixed answer text; None = the reply function
    status: int = 500  # for mode "status"
    error_type: str | None = None  # None: the API's type for the status (or overloaded_error)
    message: str = "the fake server was told to fail"
    retry_after: str | None = "1"  # for mode "rate_limit"; None = no header
    times: int | None = None  # misbehave this many times, then back to normal
    delay_s: float = 0.0  # pause between events
    chunk_chars: int = 0  # characters per text_delta; 0 = word by word
    error_at: int | None = None  # error_event: before this text piece (None: half-way)
    cache_read: int = 0  # prompt tokens reported as read from the prompt cache

    @classmethod
    def from_options(cls, mode: str = "normal", **options: Any) -> Behaviour:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        return cls(mode=mode, **options)


class InvalidRequest(Exception):
    """What the real API would answer with a 400 invalid_request_error."""


class FakeAnthropic(LoopbackServer):
    url_path = "/v1"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reply_fn: ReplyFn = default_reply,
        require_key: str | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self.reply_fn = reply_fn
        # When set, a request must carry it in x-api-key; a wrong one gets a 401 that echoes it
        # back (as careless proxies do), so tests can check the backend never repeats it.
        self.require_key = require_key
        self.behaviour = Behaviour()
        self.turns: deque[Turn] = deque()
        self.requests: list[dict[str, Any]] = []
        self.received = asyncio.Event()  # set at every messages request

    @property
    def bodies(self) -> list[Any]:
        return [r["body"] for r in self.requests]

    @property
    def headers(self) -> list[dict[str, str]]:
        return [r["headers"] for r in self.requests]

    def set_mode(self, mode: str = "normal", **options: Any) -> None:
        self.behaviour = Behaviour.from_options(mode, **options)

    def script(self, *turns: Turn) -> None:
        """Answer the next requests with these turns, in order (then the reply function again)."""
        self.turns.extend(turns)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.turns.clear()
        self.requests.clear()
        self.disconnects = 0
        self.disconnected.clear()
        self.received.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/_control", self._control)
        app.router.add_get("/_requests", self._get_requests)
        app.router.add_delete("/_requests", self._clear_requests)

    # ---- control endpoints (for a fake running in another process)

    async def _control(self, request: web.Request) -> web.Response:
        options = await request.json()
        try:
            self.set_mode(**options)
        except (TypeError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(asdict(self.behaviour))

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # ---- the messages endpoint

    def _take_behaviour(self) -> Behaviour:
        """The behaviour for this request; a `times`-limited one counts down to normal."""
        current = self.behaviour
        if current.times is not None:
            current.times -= 1
            if current.times <= 0:
                self.behaviour = Behaviour(reply=current.reply, delay_s=current.delay_s)
        return current

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        self.received.set()
        presented = request.headers.get("x-api-key")
        if self.require_key is not None and presented != self.require_key:
            if presented is None:
                return _error(401, "authentication_error", "x-api-key header is required")
            return _error(401, "authentication_error", f"invalid x-api-key: {presented}")
        try:
            check_request(request.headers.get("anthropic-version"), body)
        except InvalidRequest as e:
            return _error(400, "invalid_request_error", str(e))
        how = self._take_behaviour()
        turn = self.turns.popleft() if self.turns else Turn()
        try:
            return await self._answer(request, body, how, turn)
        except (asyncio.CancelledError, ConnectionError):
            self.saw_disconnect()
            raise

    async def _answer(
        self, request: web.Request, body: dict[str, Any], how: Behaviour, turn: Turn
    ) -> web.StreamResponse:
        if how.mode == "hang":
            await asyncio.Event().wait()  # never answers; ends when the client hangs up
        if how.mode == "status":
            return _error(
                how.status, how.error_type or ERROR_TYPES.get(how.status, "api_error"), how.message
            )
        if how.mode == "overloaded":
            return _error(529, "overloaded_error", "Overloaded")
        if how.mode == "rate_limit":
            headers = {"retry-after": how.retry_after} if how.retry_after is not None else {}
            return _error(
                429, "rate_limit_error", "Number of requests has exceeded your rate limit", headers
            )
        text = (
            turn.text if turn.text is not None else (how.reply or self.reply_fn(body["messages"]))
        )
        if turn.tool_uses and turn.text is None:
            text = ""  # a scripted tool turn says nothing unless told to
        thinking = turn.thinking or (THINKING if how.mode == "thinking" else "")
        if body.get("stream") is not True:
            return web.json_response(_whole_message(body, text, thinking, turn, how))
        return await _Stream(request, body, how).send(text, thinking, turn.tool_uses)


class _Stream:
    """One streamed message: every event carries its `type` in both the event line and the data."""

    def __init__(self, request: web.Request, body: dict[str, Any], how: Behaviour) -> None:
        self.request = request
        self.body = body
        self.how = how
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        self.index = 0  # of the next content block

    async def event(self, data: dict[str, Any]) -> None:
        await self.response.write(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode())
        if self.how.delay_s:
            await asyncio.sleep(self.how.delay_s)

    async def send(
        self, text: str, thinking: str, tool_uses: list[tuple[str, dict[str, Any]]]
    ) -> web.StreamResponse:
        how = self.how
        await self.response.prepare(self.request)
        message = _message_shell(self.body, how)
        await self.event({"type": "message_start", "message": message})
        await self.event({"type": "ping"})
        if thinking:
            await self._thinking(thinking)
        pieces = _split(text, how.chunk_chars) if text else []
        if pieces or not tool_uses:
            stop_early = await self._text(pieces)
            if stop_early:
                return self.response
        for name, arguments in tool_uses:
            await self._tool_use(name, arguments)
            if how.mode == "max_tokens":
                break
        output = _tokens(text) + sum(_tokens(json.dumps(a)) for _, a in tool_uses)
        if how.mode == "max_tokens":
            stop_reason = "max_tokens"
        else:
            stop_reason = "tool_use" if tool_uses else "end_turn"
        await self.event(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": output},
            }
        )
        await self.event({"type": "message_stop"})
        await self.response.write_eof()
        return self.response

    async def _start(self, block: dict[str, Any]) -> int:
        index = self.index
        self.index += 1
        await self.event({"type": "content_block_start", "index": index, "content_block": block})
        return index

    async def _delta(self, index: int, delta: dict[str, Any]) -> None:
        await self.event({"type": "content_block_delta", "index": index, "delta": delta})

    async def _stop(self, index: int) -> None:
        await self.event({"type": "content_block_stop", "index": index})

    async def _thinking(self, thinking: str) -> None:
        index = await self._start({"type": "thinking", "thinking": "", "signature": ""})
        for piece in _split(thinking, 0):
            await self._delta(index, {"type": "thinking_delta", "thinking": piece})
        await self._delta(
            index, {"type": "signature_delta", "signature": "EqQBCgIYAhIM" + "x" * 40}
        )
        await self._stop(index)
        index = await self._start({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"})
        await self._stop(index)

    async def _text(self, pieces: list[str]) -> bool:
        """The text block; True when the mode ended the stream inside it."""
        how = self.how
        index = await self._start({"type": "text", "text": ""})
        half = len(pieces) // 2
        error_at = half if how.error_at is None else how.error_at
        for i, piece in enumerate(pieces + [""]):
            if how.mode == "hang_mid" and i == 2:
                await asyncio.Event().wait()
            if how.mode == "error_event" and i == error_at:
                kind = how.error_type or "overloaded_error"
                said = "Overloaded" if kind == "overloaded_error" else how.message
                error = {"type": kind, "message": said}
                await self.event({"type": "error", "error": error})
                await self.response.write_eof()
                return True
            if how.mode == "cut" and i == max(1, half):
                self.request.transport.close()  # type: ignore[union-attr]  # a broken stream
                return True
            if how.mode == "truncate" and i == half:
                await self.response.write_eof()
                return True
            if i < len(pieces):
                await self._delta(index, {"type": "text_delta", "text": piece})
        await self._stop(index)
        return False

    async def _tool_use(self, name: str, arguments: dict[str, Any]) -> None:
        block = {"type": "tool_use", "id": _tool_use_id(), "name": name, "input": {}}
        index = await self._start(block)
        await self._delta(index, {"type": "input_json_delta", "partial_json": ""})
        raw = json.dumps(arguments)
        if self.how.mode == "max_tokens":
            raw = raw[: len(raw) // 2]  # the cap cut the input short
        for start in range(0, len(raw), 7):  # the API splits the JSON anywhere
            await self._delta(
                index, {"type": "input_json_delta", "partial_json": raw[start : start + 7]}
            )
        await self._stop(index)


def _message_shell(body: dict[str, Any], how: Behaviour) -> dict[str, Any]:
    images = [len(_images(m.get("content"))) for m in body["messages"]]
    text = [_plain_text(m.get("content", "")) for m in body["messages"]]
    prompt = json.dumps(body.get("system", "")) + json.dumps(text)
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": body["model"],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _tokens(prompt) + IMAGE_TOKENS * sum(images),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": how.cache_read,
            "output_tokens": 1,
        },
    }


def _whole_message(
    body: dict[str, Any], text: str, thinking: str, turn: Turn, how: Behaviour
) -> dict[str, Any]:
    """The non-streamed answer (stream absent or false)."""
    message = _message_shell(body, how)
    content: list[dict[str, Any]] = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": "EqQBCgIYAhIM"})
    if text:
        content.append({"type": "text", "text": text})
    for name, arguments in turn.tool_uses:
        content.append({"type": "tool_use", "id": _tool_use_id(), "name": name, "input": arguments})
    message["content"] = content
    message["stop_reason"] = "tool_use" if turn.tool_uses else "end_turn"
    message["usage"]["output_tokens"] = _tokens(text)
    return message


def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _split(text: str, size: int) -> list[str]:
    """Word by word (each word keeps its following space), or fixed-size pieces."""
    if size:
        return [text[i : i + size] for i in range(0, len(text), size)]
    words = text.split(" ")
    return [piece for piece in [w + " " for w in words[:-1]] + [words[-1]] if piece]


def _error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


# ---- what the real API refuses


def check_request(version: str | None, body: Any) -> None:
    """Raise InvalidRequest with the API's kind of message for a request it would refuse."""
    if not version:
        raise InvalidRequest("anthropic-version: header is required")
    if not isinstance(body, dict):
        raise InvalidRequest("The request body is not valid JSON.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("model: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Field required")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
        raise InvalidRequest("temperature: Input should be less than or equal to 1")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream: Input should be a valid boolean")
    _check_system(body.get("system", ""))
    _check_tools(body.get("tools", []))
    _check_messages(body.get("messages"))


def _check_system(system: Any) -> None:
    if isinstance(system, str):
        return
    if not isinstance(system, list) or not all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        raise InvalidRequest("system: Input should be a valid string or a list of text blocks")


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools.{i}.name: Field required")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(f"tools.{i}.input_schema: Field required (a JSON Schema object)")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required")
    previous_tool_uses: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        role = message["role"]
        if i == 0 and role != "user":
            raise InvalidRequest('messages: first message must use the "user" role')
        if i > 0 and messages[i - 1].get("role") == role:
            raise InvalidRequest(
                f'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        blocks = _blocks(message.get("content"), f"messages.{i}.content")
        answered = [b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"]
        stray = [tool_id for tool_id in answered if tool_id not in previous_tool_uses]
        if stray:
            raise InvalidRequest(
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{stray[0]}. Each `tool_result` block must have a corresponding `tool_use` "
                "block in the previous message."
            )
        unanswered = previous_tool_uses - set(answered)
        if unanswered:
            raise InvalidRequest(
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {sorted(unanswered)[0]}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )
        _check_block_roles(blocks, role, i)
        previous_tool_uses = {b["id"] for b in blocks if b.get("type") == "tool_use"}


def _blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        if not content:
            raise InvalidRequest(f"{path}: text content blocks must be non-empty")
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"{path}: Input should be a valid string or a non-empty list")
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"].strip():
                raise InvalidRequest(
                    f"{path}.{j}.text: text content blocks must contain non-whitespace text"
                )
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequest(f"{path}.{j}.tool_use: id and name are required")
            if not isinstance(block.get("input"), dict):
                raise InvalidRequest(
                    f"{path}.{j}.tool_use.input: Input should be a valid dictionary"
                )
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequest(f"{path}.{j}.tool_result.tool_use_id: Field required")
            if not isinstance(block.get("content", ""), str | list):
                raise InvalidRequest(f"{path}.{j}.tool_result.content: Input should be a string")
            if not isinstance(block.get("is_error", False), bool):
                raise InvalidRequest(f"{path}.{j}.tool_result.is_error: Input should be a boolean")
        elif kind == "image":
            _check_image_source(block.get("source"), f"{path}.{j}.image.source")
        elif kind not in ("document", "thinking", "redacted_thinking"):
            raise InvalidRequest(f"{path}.{j}.type: Input tag {kind!r} does not match any block")
    return content


def _check_image_source(source: Any, path: str) -> None:
    if not isinstance(source, dict) or source.get("type") not in ("base64", "url", "file"):
        raise InvalidRequest(f"{path}: Input tag does not match 'base64', 'url' or 'file'")
    if source["type"] != "base64":
        raise InvalidRequest(f"{path}: this fake takes base64 images only")
    media_type = source.get("media_type")
    if media_type not in SUPPORTED_TYPES:
        listed = ", ".join(f"'{t}'" for t in SUPPORTED_TYPES)
        raise InvalidRequest(f"{path}.base64.media_type: Input should be {listed}")
    if not isinstance(source.get("data"), str):
        raise InvalidRequest(f"{path}.base64.data: Field required")
    try:
        data = decode_base64(source["data"])
        actual = sniff_type(data)
        if actual is not None and actual != media_type:
            raise ValueError(
                f"The image was specified using the {media_type} media type, but the image "
                f"appears to be a {actual} image"
            )
        check_image(media_type, data)
    except ValueError as e:
        raise InvalidRequest(f"{path}.base64: {e}") from None


def _check_block_roles(blocks: list[dict[str, Any]], role: str, i: int) -> None:
    kinds = [b.get("type") for b in blocks]
    if role == "user" and "tool_use" in kinds:
        raise InvalidRequest(f"messages.{i}: `tool_use` blocks can only be in assistant messages")
    if role == "assistant" and "tool_result" in kinds:
        raise InvalidRequest(f"messages.{i}: `tool_result` blocks can only be in user messages")
    if role == "assistant" and "image" in kinds:
        raise InvalidRequest(f"messages.{i}: `image` blocks can only be in user messages")
    results = [j for j, kind in enumerate(kinds) if kind == "tool_result"]
    if results and "text" in kinds and kinds.index("text") < results[-1]:
        raise InvalidRequest(
            f"messages.{i}.content: `tool_result` blocks must come before any text"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument("--reply", default=None, help="a fixed answer instead of the computed one")
    parser.add_argument("--require-key", default=None, help="the x-api-key every request needs")
    args = parser.parse_args()
    fake = FakeAnthropic(host=args.host, port=args.port, require_key=args.require_key)
    fake.set_mode(args.mode, reply=args.reply)
    asyncio.run(fake.serve_until_signalled("fake_anthropic"))


if __name__ == "__main__":
    main()
