"""A real local server speaking OpenAI's Responses and Conversations APIs, for tests and demos.

    async with FakeResponses(answer=lambda items: f"I saw {len(items)} items") as fake:
        fake.base_url                     # http://127.0.0.1:<port>/v1
        fake.script(Turn(calls=[("lookup", {"q": "x"})]), Turn(status=429, retry_after="1"))
        fake.bodies                       # every POST /v1/responses body, in order
        fake.items(conversation_id)       # what the platform holds for a conversation
        fake.delete_conversation(conversation_id)

Endpoints: POST /v1/responses (stream true → SSE events as the real API sends them, each with
`event:` and a `type`/`sequence_number` in its data; stream false → the response object),
POST /v1/conversations, GET/DELETE /v1/conversations/{id}, GET/POST /v1/conversations/{id}/items.
With `conversation`, the model sees the stored items followed by the new input, and a successful
response appends the input and output items to the conversation; an unknown or deleted id is a
404 naming the `conversation` param. A function_call_output whose call_id the model never issued
is a 400, as on the real API. A user message's content parts are checked as the API does:
`input_text`, `input_image` (a base64 data URL of a readable PNG, JPEG, GIF or WebP, else 400)
and `input_file`; the default answer says what it saw, e.g. "Fake model says: <text> I see an
image (image/png, 75 bytes, 4x3).". Scripted turns (`script`) are taken one per response request;
without one, the model answers `answer(items)` in text.
Subprocess: python -m devtools.fake_responses --port 0  (prints "fake_responses listening on …")
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devtools.images import check_image, decode_data_url, describe_image, sniff_type
from devtools.loopback import LoopbackServer

# Conversations API: "You may add up to 20 items at a time."
MAX_ITEMS_PER_CALL = 20
REASONING = "The user wants a short answer; keep it brief."
INPUT_PART_TYPES = ("input_text", "input_image", "input_file")
IMAGE_TOKENS = 765  # what the real API bills a 1024x1024 image at high detail

AnswerFn = Callable[[list[dict[str, Any]]], str]


def default_answer(items: list[dict[str, Any]]) -> str:
    """`Fake model says: <the last user text>`."""
    users = [i for i in items if i.get("type") == "message" and i.get("role") == "user"]
    if not users:
        return "Fake model says: "
    seen = "".join(f" {describe_image(*image)}." for image in item_images(users[-1]))
    return f"Fake model says: {item_text(users[-1])}{seen}"


def item_text(item: dict[str, Any]) -> str:
    """The text of a (normalised) message item."""
    return "".join(part.get("text", "") for part in item.get("content", []))


def item_images(item: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(mime, bytes) of a (checked) message item's input images."""
    return [
        decode_data_url(part["image_url"])
        for part in item.get("content", [])
        if part.get("type") == "input_image"
    ]


@dataclass
class Turn:
    """One scripted response. Without `status`/`fail`, the model says `text` (None: the answer
    function decides) and then asks for `calls` [(name, arguments)]; arguments given as a string
    are sent as they are (a model can produce broken JSON)."""

    text: str | None = None
    calls: list[tuple[str, dict[str, Any] | str]] = field(default_factory=list)
    status: int | None = None  # answer with this HTTP error instead
    message: str = "the fake server was told to fail"
    code: str | None = None  # the error's `code`
    retry_after: str | None = None  # Retry-After header of an HTTP error
    # In-stream endings: "failed" (response.failed), "error" (an `error` event), "incomplete"
    # (response.incomplete, max_output_tokens), "cut" (connection dropped), "truncate" (ends
    # without a terminal event), "hang" (no headers ever), "hang_mid" (stalls after some text).
    fail: str | None = None
    reasoning: bool = False  # a reasoning item with a streamed summary comes first
    ignore_stream: bool = False  # answer in JSON even to stream=true (as some proxies do)
    delay_s: float = 0.0  # pause between events


class FakeResponses(LoopbackServer):
    url_path = "/v1"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        answer: AnswerFn = default_answer,
        require_key: str | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self.answer = answer
        self.require_key = require_key  # when set, other keys get a 401 that echoes them back
        self.requests: list[dict[str, Any]] = []  # {method, path, authorization, body}
        self.conversations: dict[str, dict[str, Any]] = {}
        self.received = asyncio.Event()  # a request arrived
        # While set to an unset Event, creating a conversation waits for it (a slow platform).
        self.conversation_gate: asyncio.Event | None = None
        self._script: deque[Turn] = deque()

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/responses"]

    def script(self, *turns: Turn) -> None:
        self._script.extend(turns)

    def items(self, conversation_id: str) -> list[dict[str, Any]]:
        return list(self.conversations[conversation_id]["items"])

    def delete_conversation(self, conversation_id: str) -> None:
        del self.conversations[conversation_id]

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/conversations", self._create_conversation)
        app.router.add_get("/v1/conversations/{id}", self._get_conversation)
        app.router.add_delete("/v1/conversations/{id}", self._delete_conversation)
        app.router.add_get("/v1/conversations/{id}/items", self._list_items)
        app.router.add_post("/v1/conversations/{id}/items", self._add_items)

    # ---- shared request handling

    async def _admit(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Record the request; return its body, or the error response to send instead."""
        raw = await request.text()
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = raw
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "body": body,
            }
        )
        self.received.set()
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.require_key is not None and presented != self.require_key:
            message = f"Incorrect API key provided: {presented}."
            return body, _error(401, message, "invalid_request_error", code="invalid_api_key")
        if not isinstance(body, dict):
            return body, _error(400, "We could not parse the JSON body of your request.")
        return body, None

    def _conversation(self, conversation_id: str) -> dict[str, Any] | None:
        return self.conversations.get(conversation_id)

    # ---- Conversations API

    async def _create_conversation(self, request: web.Request) -> web.Response:
        body, refused = await self._admit(request)
        if refused is not None:
            return refused
        if self.conversation_gate is not None:
            try:
                await self.conversation_gate.wait()
            except asyncio.CancelledError:
                self.saw_disconnect()
                raise
        raw_items = body.get("items") or []
        if len(raw_items) > MAX_ITEMS_PER_CALL:
            return _too_many_items(len(raw_items))
        try:
            items = [_stored(item) for item in raw_items]
        except ValueError as e:
            return _error(400, str(e), param="items")
        conversation_id = f"conv_{uuid.uuid4().hex}"
        self.conversations[conversation_id] = {
            "id": conversation_id,
            "object": "conversation",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
            "items": items,
        }
        return web.json_response(_public(self.conversations[conversation_id]))

    async def _get_conversation(self, request: web.Request) -> web.Response:
        _, refused = await self._admit(request)
        if refused is not None:
            return refused
        conversation = self._conversation(request.match_info["id"])
        if conversation is None:
            return _conversation_not_found(request.match_info["id"])
        return web.json_response(_public(conversation))

    async def _delete_conversation(self, request: web.Request) -> web.Response:
        _, refused = await self._admit(request)
        if refused is not None:
            return refused
        conversation_id = request.match_info["id"]
        if self.conversations.pop(conversation_id, None) is None:
            return _conversation_not_found(conversation_id)
        return web.json_response(
            {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
        )

    async def _list_items(self, request: web.Request) -> web.Response:
        _, refused = await self._admit(request)
        if refused is not None:
            return refused
        conversation = self._conversation(request.match_info["id"])
        if conversation is None:
            return _conversation_not_found(request.match_info["id"])
        items = list(conversation["items"])
        if request.query.get("order", "desc") == "desc":  # the real API lists newest first
            items.reverse()
        return web.json_response(_item_list(items[: int(request.query.get("limit", 20))]))

    async def _add_items(self, request: web.Request) -> web.Response:
        body, refused = await self._admit(request)
        if refused is not None:
            return refused
        conversation = self._conversation(request.match_info["id"])
        if conversation is None:
            return _conversation_not_found(request.match_info["id"])
        raw_items = body.get("items") or []
        if len(raw_items) > MAX_ITEMS_PER_CALL:
            return _too_many_items(len(raw_items))
        try:
            items = [_stored(item) for item in raw_items]
        except ValueError as e:
            return _error(400, str(e), param="items")
        conversation["items"] += items
        return web.json_response(_item_list(items))

    # ---- Responses API

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, refused = await self._admit(request)
        if refused is not None:
            return refused
        turn = self._script.popleft() if self._script else Turn()
        try:
            return await self._respond(request, body, turn)
        except (asyncio.CancelledError, ConnectionError):
            self.saw_disconnect()
            raise

    async def _respond(
        self, request: web.Request, body: dict[str, Any], turn: Turn
    ) -> web.StreamResponse:
        if turn.fail == "hang":
            await asyncio.Event().wait()  # never answers; ends when the client hangs up
        if turn.status is not None:
            headers = {"Retry-After": turn.retry_after} if turn.retry_after else {}
            return _error(turn.status, turn.message, code=turn.code, headers=headers)
        if "conversation" in body and "previous_response_id" in body:
            return _error(
                400,
                "Mutually exclusive parameters: Ensure you are only providing one of: "
                "'previous_response_id' or 'conversation'.",
                param="previous_response_id",
            )
        raw_input = body.get("input", [])
        if isinstance(raw_input, str):
            raw_input = [{"role": "user", "content": raw_input}]
        if not isinstance(raw_input, list):
            return _error(400, "Invalid type for 'input'.", param="input")
        try:
            new_items = [_stored(item) for item in raw_input]
        except ValueError as e:
            return _error(400, str(e), param="input")
        conversation = None
        conversation_id = _conversation_id(body.get("conversation"))
        if conversation_id is not None:
            conversation = self._conversation(conversation_id)
            if conversation is None:
                return _conversation_not_found(conversation_id)
        seen = (conversation["items"] if conversation else []) + new_items
        unmatched = _unmatched_output(seen)
        if unmatched is not None:
            return _error(
                400,
                f"No tool call found for function call output with call_id {unmatched}.",
                param="input",
            )
        text = turn.text if turn.text is not None else self.answer(seen)
        output = _output_items(text, turn)
        usage = _usage(body.get("instructions"), seen, output)
        response = _response_object(body, conversation_id)

        def commit() -> None:
            """The platform stores the turn before it reports the response finished."""
            if conversation is not None:
                conversation["items"] += new_items + output

        if body.get("stream") is not True or turn.ignore_stream:
            commit()
            return web.json_response(
                {**response, "status": "completed", "output": output, "usage": usage}
            )
        return await self._stream(request, response, output, usage, turn, commit)

    async def _stream(
        self,
        request: web.Request,
        response: dict[str, Any],
        output: list[dict[str, Any]],
        usage: dict[str, Any],
        turn: Turn,
        commit: Callable[[], None],
    ) -> web.StreamResponse:
        """Send the events of one response; the turn is stored only if it ends normally."""
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        events = _Events(stream, turn.delay_s)
        await events.send("response.created", response=response)
        await events.send("response.in_progress", response=response)
        for index, item in enumerate(output):
            if turn.fail == "error":
                await events.send(
                    "error", code="server_error", message="The model is overloaded.", param=None
                )
                await stream.write_eof()
                return stream
            await events.item(index, item, turn)
        if turn.fail == "cut":
            request.transport.close()  # type: ignore[union-attr]  # no terminal event: broken
            return stream
        if turn.fail == "truncate":
            await stream.write_eof()
            return stream
        final = {**response, "output": output, "usage": usage}
        if turn.fail == "failed":
            error = {"code": turn.code or "server_error", "message": turn.message}
            failed = {**final, "status": "failed", "error": error}
            await events.send("response.failed", response=failed)
        elif turn.fail == "incomplete":
            commit()
            details = {"reason": "max_output_tokens"}
            incomplete = {**final, "status": "incomplete", "incomplete_details": details}
            await events.send("response.incomplete", response=incomplete)
        else:
            commit()
            await events.send("response.completed", response={**final, "status": "completed"})
        await stream.write_eof()
        return stream


class _Events:
    """SSE events as the Responses API writes them: `event:` line, JSON with type and sequence."""

    def __init__(self, stream: web.StreamResponse, delay_s: float) -> None:
        self.stream = stream
        self.delay_s = delay_s
        self.sequence = 0

    async def send(self, kind: str, **data: Any) -> None:
        payload = json.dumps({"type": kind, "sequence_number": self.sequence, **data})
        self.sequence += 1
        await self.stream.write(f"event: {kind}\ndata: {payload}\n\n".encode())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def item(self, index: int, item: dict[str, Any], turn: Turn) -> None:
        """One output item: added, its streamed parts, done."""
        at = {"output_index": index}
        if item["type"] == "reasoning":
            await self.send("response.output_item.added", item={**item, "summary": []}, **at)
            part = {"type": "summary_text", "text": ""}
            ids = {"item_id": item["id"], **at, "summary_index": 0}
            await self.send("response.reasoning_summary_part.added", part=part, **ids)
            for piece in _words(REASONING):
                await self.send("response.reasoning_summary_text.delta", delta=piece, **ids)
            await self.send("response.reasoning_summary_text.done", text=REASONING, **ids)
        elif item["type"] == "message":
            await self.send(
                "response.output_item.added",
                item={**item, "status": "in_progress", "content": []},
                **at,
            )
            ids = {"item_id": item["id"], **at, "content_index": 0}
            part = {"type": "output_text", "text": "", "annotations": []}
            await self.send("response.content_part.added", part=part, **ids)
            text = item_text(item)
            for i, piece in enumerate(_words(text)):
                if turn.fail == "hang_mid" and i == 2:
                    await asyncio.Event().wait()
                if turn.fail in ("cut", "truncate") and i == 2:
                    return
                await self.send("response.output_text.delta", delta=piece, logprobs=[], **ids)
            await self.send("response.output_text.done", text=text, logprobs=[], **ids)
            await self.send("response.content_part.done", part=item["content"][0], **ids)
        else:  # function_call
            started = {**item, "arguments": "", "status": "in_progress"}
            await self.send("response.output_item.added", item=started, **at)
            ids = {"item_id": item["id"], **at}
            arguments = item["arguments"]
            for start in range(0, len(arguments), 5):
                delta = arguments[start : start + 5]
                await self.send("response.function_call_arguments.delta", delta=delta, **ids)
            await self.send("response.function_call_arguments.done", arguments=arguments, **ids)
        await self.send("response.output_item.done", item=item, **at)


def _stored(item: Any) -> dict[str, Any]:
    """An input item as the platform stores it: typed, with an id and content parts."""
    if not isinstance(item, dict):
        raise ValueError("Invalid type for input item: expected an object.")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ValueError(
                f"Invalid value: '{role}'. Supported values are: 'assistant', "
                "'system', 'developer', and 'user'."
            )
        content = item.get("content")
        text_type = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            parts = [{"type": text_type, "text": content}]
        elif isinstance(content, list):
            parts = [_content_part(part, role) for part in content]
        else:
            raise ValueError("Invalid type for message content.")
        if role == "assistant":
            parts = [{**part, "annotations": part.get("annotations", [])} for part in parts]
        return {
            "type": "message",
            "id": item.get("id") or f"msg_{uuid.uuid4().hex}",
            "status": "completed",
            "role": role,
            "content": parts,
        }
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise ValueError(f"Missing required parameter: 'function_call.{key}'.")
        try:
            json.loads(item["arguments"])
        except ValueError:
            raise ValueError("function_call.arguments must be a JSON string.") from None
        return {
            "type": "function_call",
            "id": item.get("id") or f"fc_{uuid.uuid4().hex}",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": item["arguments"],
            "status": "completed",
        }
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
            raise ValueError("Missing required parameter: 'function_call_output.output'.")
        return {
            "type": "function_call_output",
            "id": item.get("id") or f"fco_{uuid.uuid4().hex}",
            "call_id": item["call_id"],
            "output": item["output"],
            "status": "completed",
        }
    raise ValueError(f"Invalid value: '{kind}' is not a supported input item type.")


def _content_part(part: Any, role: str) -> dict[str, Any]:
    """A message content part as the real API checks it (input images: data URLs here)."""
    allowed = ("output_text", "refusal") if role == "assistant" else INPUT_PART_TYPES
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in allowed:
        listed = ", ".join(f"'{k}'" for k in allowed)
        raise ValueError(f"Invalid value: '{kind}'. Supported values are: {listed}.")
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise ValueError("Missing required parameter: 'input_image.image_url'.")
        if part.get("detail", "auto") not in ("low", "high", "auto"):
            raise ValueError("Invalid value for 'input_image.detail': use low, high or auto.")
        try:
            mime, data = decode_data_url(url)
            check_image(sniff_type(data) or mime, data)  # the API goes by the bytes
        except ValueError as e:
            raise ValueError(f"Invalid 'input_image.image_url': {e}.") from None
    elif not isinstance(part.get("text"), str):
        raise ValueError(f"Missing required parameter: '{kind}.text'.")
    return dict(part)


def _unmatched_output(items: list[dict[str, Any]]) -> str | None:
    """The call_id of a function_call_output no earlier function_call issued, if any."""
    issued: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            issued.add(item["call_id"])
        elif item["type"] == "function_call_output" and item["call_id"] not in issued:
            return item["call_id"]
    return None


def _output_items(text: str, turn: Turn) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    if turn.reasoning:
        summary = [{"type": "summary_text", "text": REASONING}]
        output.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": summary})
    if text:
        part = {"type": "output_text", "text": text, "annotations": []}
        output.append(
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "status": "completed",
                "role": "assistant",
                "content": [part],
            }
        )
    for name, arguments in turn.calls:
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": f"call_{uuid.uuid4().hex[:24]}",
                "name": name,
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                "status": "completed",
            }
        )
    return output


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _item_tokens(item: dict[str, Any]) -> int:
    if item["type"] == "message":
        return _tokens(item_text(item)) + IMAGE_TOKENS * len(item_images(item))
    return _tokens(item.get("arguments", "") + item.get("output", ""))


def _usage(
    instructions: Any, seen: list[dict[str, Any]], output: list[dict[str, Any]]
) -> dict[str, Any]:
    prompt = _tokens(instructions if isinstance(instructions, str) else "")
    prompt += sum(_item_tokens(item) for item in seen)
    reasoning = sum(_tokens(REASONING) for item in output if item["type"] == "reasoning")
    completion = sum(_item_tokens(item) for item in output if item["type"] != "reasoning")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion + reasoning,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion + reasoning,
    }


def _conversation_id(value: Any) -> str | None:
    """`conversation` is an id or `{"id": …}`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def _response_object(body: dict[str, Any], conversation_id: str | None) -> dict[str, Any]:
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "model": str(body.get("model") or "fake"),
        "instructions": body.get("instructions"),
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "max_output_tokens": body.get("max_output_tokens"),
        "tools": body.get("tools", []),
    }


def _public(conversation: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conversation.items() if k != "items"}


def _item_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


def _words(text: str) -> list[str]:
    """Word by word, each word keeping its following space."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + ([words[-1]] if words[-1] else [])


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _conversation_not_found(conversation_id: str) -> web.Response:
    message = f"Conversation with id '{conversation_id}' not found."
    return _error(404, message, param="conversation")


def _too_many_items(count: int) -> web.Response:
    message = (
        f"Invalid 'items': array too long. Expected an array with maximum length "
        f"{MAX_ITEMS_PER_CALL}, but got an array with length {count} instead."
    )
    return _error(400, message, param="items", code="array_above_max_length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    args = parser.parse_args()
    fake = FakeResponses(host=args.host, port=args.port)
    asyncio.run(fake.serve_until_signalled("fake_responses"))


if __name__ == "__main__":
    main()
