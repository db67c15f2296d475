"""A real local OpenAI-compatible server for tests and demos, with switchable misbehaviour.

In-process:   async with FakeOpenAI() as fake: fake.base_url … fake.set_mode("rate_limit", times=1)
Subprocess:   python -m devtools.fake_openai --port 0   (prints "fake_openai listening on <base_url>")
              POST /_control {"mode": "hang"}  ·  GET /_requests  ·  DELETE /_requests  ·  GET /_state

Modes: normal, hang (no headers ever), hang_mid (stalls after two pieces), status (any HTTP error,
default 500), rate_limit (429 + Retry-After), cut (connection dropped mid-stream), truncate (stream
ends cleanly without finish_reason or [DONE]), malformed (an event that is not JSON), wrong_type
(200 text/html), think (<think> block split across events), reasoning (delta.reasoning_content
first), json (ignores stream=true), error_event (an error object inside the 200 stream).
Options (set_mode keywords or /_control keys): reply, status, message, retry_after, times, delay_s,
first_delay_s, chunk_chars, write_bytes. A model-like pace: `first_delay_s=0.4, delay_s=0.04`
(first words at 400 ms, then 25 words a second).

Tools, like a model would use them: when the request offers tools and the newest user message
has a line `call <tool> <json arguments>`, the answer is that tool call (streamed as a real one:
id and name first, the arguments in pieces, finish_reason "tool_calls"); after the results come
back it answers in words, quoting them. `loop <tool> <json>` asks for the tool again after every
result (to test a turn's step bound). Requests whose tool messages do not answer the previous
assistant message's calls are refused with 400, as the real API does.

Images: a user message's content may be a list of `text` and `image_url` parts; an image must
be a base64 data URL of a PNG, JPEG, GIF or WebP whose bytes are readable (devtools.images),
else 400 (invalid_image_format), and only user messages may carry one. The default reply says
what it saw: "Fake model says: <text> I see an image (image/png, 75 bytes, 4x3).".

Audio: POST /v1/audio/transcriptions (multipart `file`, `model`, `response_format` json or
text) transcribes WAV files with devtools.audio.transcribe_wav (the words embedded by
make_wav, else the tone's frequency); a file name without a supported extension is refused
as by the real API, and bytes that are not WAV get "Audio file might be corrupted or
unsupported". POST /v1/audio/speech ({model, input, voice, response_format}) answers a WAV
(Content-Type audio/wav, whatever format was asked: no Opus encoder in the stdlib) carrying
the input as its words, so transcribing it gives the input back. Both are recorded in
`requests` (the transcription's form fields, file name, type and size) and honour hang,
status, rate_limit, wrong_type and malformed (a broken JSON body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web

from devtools.audio import make_wav, transcribe_wav
from devtools.images import check_image, decode_data_url, describe_image, sniff_type
from devtools.loopback import LoopbackServer

MODES = (
    "normal",
    "hang",
    "hang_mid",
    "status",
    "rate_limit",
    "cut",
    "truncate",
    "malformed",
    "wrong_type",
    "think",
    "reasoning",
    "json",
    "error_event",
)
THINKING = "Let me think about this carefully. The user wants an answer."
# What /audio/transcriptions accepts (by file name, as the real API does) and /audio/speech makes.
TRANSCRIBABLE = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_SPEECH_INPUT = 4096
IMAGE_TOKENS = 765  # what the real API bills a 1024x1024 image at high detail

ReplyFn = Callable[[list[dict[str, Any]]], str]
_TOOL_LINE = re.compile(r"^(call|loop) ([A-Za-z0-9_-]+)(?: (\{.*\}))?$", re.MULTILINE)


def default_reply(messages: list[dict[str, Any]]) -> str:
    results = _trailing_tool_results(messages)
    if results:
        return "Using the tools: " + "; ".join(str(m.get("content", "")) for m in results)
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    seen = "".join(f" {describe_image(*image)}." for image in content_images(last))
    return f"Fake model says: {content_text(last)}{seen}"


def content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")


def content_images(content: Any) -> list[tuple[str, bytes]]:
    """(mime, bytes) of a message's image parts (already checked by `content_problem`)."""
    if not isinstance(content, list):
        return []
    return [
        decode_data_url(p["image_url"]["url"])
        for p in content
        if isinstance(p, dict) and p.get("type") == "image_url"
    ]


def content_problem(messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(message, code) of the 400 the real API gives for malformed content parts."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    return f"Invalid type for '{where}.text': expected a string.", "invalid_type"
            elif kind == "image_url":
                if message.get("role") != "user":
                    return (
                        f"Invalid '{where}': image_url is only supported in messages with role "
                        f"'user', not '{message.get('role')}'.",
                        "invalid_value",
                    )
                url = (
                    part.get("image_url", {}).get("url")
                    if isinstance(part.get("image_url"), dict)
                    else None
                )
                if not isinstance(url, str):
                    return (
                        f"Missing required parameter: '{where}.image_url.url'.",
                        "missing_required_parameter",
                    )
                try:
                    mime, data = decode_data_url(url)
                    check_image(sniff_type(data) or mime, data)  # the API goes by the bytes
                except ValueError as e:
                    return f"Invalid image in '{where}': {e}.", "invalid_image_format"
            else:
                return (
                    f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url', "
                    "'input_audio', 'refusal', 'audio', and 'file'.",
                    "invalid_value",
                )
    return None


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.append(message)
    return list(reversed(results))


def tool_requests(messages: list[dict[str, Any]], offered: set[str]) -> list[dict[str, Any]]:
    """The calls this fake model makes now: `call` lines of the newest user message (once, before
    any result came back), `loop` lines after every result too. Only offered tools are called."""
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if last_user is None:
        return []
    after_results = messages[-1].get("role") == "tool"
    calls = []
    for verb, name, arguments in _TOOL_LINE.findall(content_text(last_user.get("content"))):
        if name in offered and (verb == "loop" or not after_results):
            calls.append({"name": name, "arguments": arguments or "{}"})
    return calls


def misplaced_tool_message(messages: list[dict[str, Any]]) -> str | None:
    """What the real API says when a tool message does not answer a call just made."""
    open_calls: set[str] = set()
    for message in messages:
        if message.get("role") == "assistant":
            open_calls = {c.get("id") for c in message.get("tool_calls") or []}
        elif message.get("role") == "tool":
            if message.get("tool_call_id") not in open_calls:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'."
                )
            open_calls.discard(message.get("tool_call_id"))
        elif open_calls:
            return "An assistant message with 'tool_calls' must be followed by tool messages."
    return None


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _message_tokens(message: dict[str, Any]) -> int:
    content = message.get("content")
    text = content_text(content) if isinstance(content, list) else str(content or "")
    return _tokens(text) + IMAGE_TOKENS * len(content_images(content))


@dataclass
class Behaviour:
    mode: str = "normal"
    reply: str | None = None  # fixed answer text; None = the reply function
    status: int = 500  # for mode "status"
    message: str = "the fake server was told to fail"
    retry_after: str | None = "1"  # for mode "rate_limit"; None = no header
    times: int | None = None  # misbehave this many times, then back to normal
    delay_s: float = 0.0  # pause between events
    first_delay_s: float = 0.0  # the first words this long after the headers (time to first token)
    chunk_chars: int = 0  # characters per content event; 0 = word by word
    write_bytes: int = 0  # split the raw output into writes of this size; 0 = one write an event

    @classmethod
    def from_options(cls, mode: str = "normal", **options: Any) -> Behaviour:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        return cls(mode=mode, **options)


class FakeOpenAI(LoopbackServer):
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
        self.require_key = require_key  # when set, other keys get a 401 that echoes them back
        self.behaviour = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.reported: list[dict[str, int]] = []  # each `usage` sent to a client, in order
        self.received = asyncio.Event()  # set at every chat request
        # (perf_counter, piece) as each piece of answer text is written; None: the stream ended.
        self.stream_log: list[tuple[float, str | None]] = []

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]

    def set_mode(self, mode: str = "normal", **options: Any) -> None:
        self.behaviour = Behaviour.from_options(mode, **options)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()
        self.reported.clear()
        self.stream_log.clear()
        self.disconnects = 0
        self.disconnected.clear()
        self.received.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcription)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/_control", self._control)
        app.router.add_get("/_requests", self._get_requests)
        app.router.add_delete("/_requests", self._clear_requests)
        app.router.add_get("/_state", self._state)

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

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "behaviour": asdict(self.behaviour),
                "requests": len(self.requests),
                "disconnects": self.disconnects,
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    # ---- the chat endpoint

    def _take_behaviour(self) -> Behaviour:
        """The behaviour for this request; a `times`-limited one counts down to normal."""
        current = self.behaviour
        if current.times is not None:
            current.times -= 1
            if current.times <= 0:
                self.behaviour = Behaviour(reply=current.reply, delay_s=current.delay_s)
        return current

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        self.requests.append(
            {
                "at": time.perf_counter(),  # benchmarks time the stream against it
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "body": body,
            }
        )
        self.received.set()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "messages: field required", "invalid_request_error")
        misplaced = misplaced_tool_message(body["messages"])
        if misplaced is not None:
            return _error(400, misplaced, "invalid_request_error")
        problem = content_problem(body["messages"])
        if problem is not None:
            return _error(400, problem[0], "invalid_request_error", code=problem[1])
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.require_key is not None and presented != self.require_key:
            return _error(401, f"Incorrect API key provided: {presented}", "invalid_api_key")
        how = self._take_behaviour()
        try:
            return await self._answer(request, body, how)
        except asyncio.CancelledError:
            self.saw_disconnect()
            raise
        except ConnectionError:
            self.saw_disconnect()
            raise

    async def _answer(self, request: web.Request, body: dict[str, Any], how: Behaviour) -> Any:
        model = str(body.get("model") or "fake")
        offered = {t["function"]["name"] for t in body.get("tools") or [] if "function" in t}
        calls = tool_requests(body["messages"], offered) if offered else []
        if calls:
            reply = ""
        elif how.reply is not None:
            reply = how.reply
        else:
            reply = self.reply_fn(body["messages"])
        if how.mode == "hang":
            await asyncio.Event().wait()  # never answers; ends when the client hangs up
        if how.mode == "status":
            return _error(how.status, how.message, "fake_error")
        if how.mode == "rate_limit":
            headers = {"Retry-After": how.retry_after} if how.retry_after is not None else {}
            return _error(429, "Rate limit reached, slow down", "rate_limit_exceeded", headers)
        if how.mode == "wrong_type":
            return web.Response(
                text="<html><body>Gateway login</body></html>", content_type="text/html"
            )
        usage = {
            "prompt_tokens": sum(_message_tokens(m) for m in body["messages"]),
            "completion_tokens": _tokens(reply),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if how.mode == "json" or body.get("stream") is not True:
            self.reported.append(usage)
            return web.json_response(_completion(model, reply, usage, calls))
        if calls:
            return await self._stream_calls(request, body, model, calls, usage)
        return await self._stream(request, body, how, model, reply, usage)

    async def _stream_calls(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        calls: list[dict[str, Any]],
        usage: dict[str, int],
    ) -> web.StreamResponse:
        """Tool calls as a real stream sends them: id, type and name, then argument pieces."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stream = _Events(model)
        await response.write(stream.event({"role": "assistant", "content": None}))
        for index, call in enumerate(calls):
            head = {
                "index": index,
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            await response.write(stream.event({"tool_calls": [head]}))
            for piece in _split(call["arguments"], 5):
                part = {"index": index, "function": {"arguments": piece}}
                await response.write(stream.event({"tool_calls": [part]}))
        await response.write(stream.event({}, finish_reason="tool_calls"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            self.reported.append(usage)
            await response.write(_sse({**stream.envelope(), "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        how: Behaviour,
        model: str,
        reply: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stream = _Events(model)
        content = f"<think>{THINKING}</think>\n\n{reply}" if how.mode == "think" else reply
        pieces = _split(content, how.chunk_chars or (3 if how.mode == "think" else 0))
        half = max(1, len(pieces) // 2)

        async def send(data: bytes) -> None:
            step = how.write_bytes or len(data)
            for start in range(0, len(data), step):
                await response.write(data[start : start + step])
                if how.write_bytes:
                    await asyncio.sleep(0.001)  # separate writes, so the client reads them apart
            if how.delay_s:
                await asyncio.sleep(how.delay_s)

        await send(b": keep-alive comment\n\n" + stream.event({"role": "assistant", "content": ""}))
        if how.mode == "reasoning":
            for piece in _split(THINKING, 0):
                await send(stream.event({"reasoning_content": piece}))
        if how.first_delay_s:  # the head event already paused delay_s
            await asyncio.sleep(max(0.0, how.first_delay_s - how.delay_s))
        for i, piece in enumerate(pieces):
            if how.mode == "hang_mid" and i == 2:
                await asyncio.Event().wait()
            if how.mode in ("cut", "truncate") and i == half:
                break
            if how.mode == "malformed" and i == half:
                await send(b'data: {"choices": [{"delta": {"content": oops\n\n')
            if how.mode == "error_event" and i == half:
                await send(_sse({"error": {"message": "model overloaded", "type": "server_error"}}))
                return response
            self.stream_log.append((time.perf_counter(), piece))
            await send(stream.event({"content": piece}))
        if how.mode == "cut":
            request.transport.close()  # type: ignore[union-attr]  # no final chunk: a broken stream
            return response
        if how.mode == "truncate":
            await response.write_eof()
            return response
        await send(stream.event({}, finish_reason="stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            self.reported.append(usage)
            await send(_sse({**stream.envelope(), "choices": [], "usage": usage}))
        self.stream_log.append((time.perf_counter(), None))  # [DONE] goes out now
        await send(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ---- the audio endpoints (speech to text, text to speech)

    async def _transcription(self, request: web.Request) -> web.StreamResponse:
        """Multipart `file` + `model` (+ `response_format` json or text); WAV is what this
        transcriber understands (devtools.audio.transcribe_wav), other audio is refused."""
        try:
            form = await request.post()
        except ValueError:
            form = None
        upload = form.get("file") if form is not None else None
        record: dict[str, Any] = (
            {field: form.get(field) for field in ("model", "response_format", "language")}
            if form is not None
            else {}
        )
        if isinstance(upload, web.FileField):
            audio = upload.file.read()
            record.update(
                filename=upload.filename, content_type=upload.content_type, bytes=len(audio)
            )
        refused = self._admit_audio(request, record)
        if refused is not None:
            return refused
        if form is None or not form.get("model"):
            return _error(400, "you must provide a model parameter", "invalid_request_error")
        if not isinstance(upload, web.FileField):
            return _error(400, "file: field required", "invalid_request_error")
        extension = upload.filename.rpartition(".")[2].lower() if "." in upload.filename else ""
        if extension not in TRANSCRIBABLE:
            return _error(
                400,
                f"Invalid file format. Supported formats: {list(TRANSCRIBABLE)}",
                "invalid_request_error",
            )
        response_format = form.get("response_format") or "json"
        if response_format not in ("json", "text"):
            return _error(
                400,
                f"response_format {response_format!r} is not supported here",
                "invalid_request_error",
            )
        return await self._misbehave_or(
            request, lambda: _transcript_response(audio, str(response_format))
        )

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        """JSON {model, input, voice, response_format}: a WAV of the input whatever format is
        asked (marked audio/wav; this fake cannot encode Opus), with the input as its words."""
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        refused = self._admit_audio(request, body)
        if refused is not None:
            return refused
        if not isinstance(body, dict):
            return _error(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        for field in ("model", "input", "voice"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _error(400, f"{field}: field required", "invalid_request_error")
        if len(body["input"]) > MAX_SPEECH_INPUT:
            return _error(
                400,
                f"input: string too long. Expected a string with maximum length {MAX_SPEECH_INPUT}",
                "invalid_request_error",
                code="string_above_max_length",
            )
        if body.get("response_format", "mp3") not in SPEECH_FORMATS:
            return _error(
                400,
                f"response_format must be one of {list(SPEECH_FORMATS)}",
                "invalid_request_error",
            )
        spoken = make_wav(body["input"], seconds=0.3)
        return await self._misbehave_or(
            request, lambda: web.Response(body=spoken, content_type="audio/wav")
        )

    def _admit_audio(self, request: web.Request, body: Any) -> web.Response | None:
        """Record an audio request; the wrong key's 401 (echoing it, as careless servers do)."""
        self.requests.append(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "body": body,
            }
        )
        self.received.set()
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.require_key is not None and presented != self.require_key:
            return _error(401, f"Incorrect API key provided: {presented}", "invalid_api_key")
        return None

    async def _misbehave_or(
        self, request: web.Request, answer: Callable[[], web.Response]
    ) -> web.StreamResponse:
        """The modes that make sense for a whole (not streamed) answer, else `answer()`."""
        how = self._take_behaviour()
        try:
            if how.mode == "hang":
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.saw_disconnect()
            raise
        if how.mode == "status":
            return _error(how.status, how.message, "fake_error")
        if how.mode == "rate_limit":
            headers = {"Retry-After": how.retry_after} if how.retry_after is not None else {}
            return _error(429, "Rate limit reached, slow down", "rate_limit_exceeded", headers)
        if how.mode == "wrong_type":
            return web.Response(
                text="<html><body>Gateway login</body></html>", content_type="text/html"
            )
        if how.mode == "malformed":
            return web.Response(text='{"text": oops', content_type="application/json")
        return answer()


def _transcript_response(audio: bytes, response_format: str) -> web.Response:
    try:
        text = transcribe_wav(audio)
    except ValueError:
        return _error(
            400,
            "Audio file might be corrupted or unsupported",
            "invalid_request_error",
            code="invalid_value",
        )
    if response_format == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    return web.json_response({"text": text})


class _Events:
    """chat.completion.chunk envelopes sharing one id, like a real stream."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        self.model = model
        self.created = int(time.time())

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def event(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse({**self.envelope(), "choices": [choice]})


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _split(text: str, size: int) -> list[str]:
    """Word by word (each word keeps its following space), or fixed-size pieces."""
    if size:
        return [text[i : i + size] for i in range(0, len(text), size)] or [""]
    pieces: list[str] = []
    for word in text.split(" "):
        pieces.append(word + " ")
    pieces[-1] = pieces[-1][:-1]
    return [p for p in pieces if p] or [""]


def _completion(
    model: str, reply: str, usage: dict[str, int], calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply}
    if calls:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ],
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
            }
        ],
        "usage": usage,
    }


def _error(
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code or kind}}
    return web.json_response(body, status=status, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument("--reply", default=None, help="a fixed answer instead of the computed one")
    args = parser.parse_args()
    fake = FakeOpenAI(host=args.host, port=args.port)
    fake.set_mode(args.mode, reply=args.reply)
    asyncio.run(fake.serve_until_signalled("fake_openai"))


if __name__ == "__main__":
    main()
