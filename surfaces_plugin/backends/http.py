"""What every HTTP provider shares: session, retries, timeouts, error mapping, redaction.

`HttpClient` is one backend spec's API client (`_call`: one request-response exchange with
retries); `HttpBackend` adds the streamed generation every agent backend has. A subclass says where to POST (`url`), what to send (`_headers`, `_body`) and how to read the
answer (`_read_events` for `text/event-stream`, optionally `_read_json`). One POST per attempt;
retries only before any text; the response is closed on every way out, cancellation included.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any, TypeVar

import aiohttp

from ..config import BackendSpec
from ..http_session import LazySession
from .base import Backend, BackendError, Chunk, ErrorKind, GenerationRequest
from .sse import SSEDecoder

T = TypeVar("T")

ERROR_BODY_LIMIT = 4096
_DETAIL_LIMIT = 200
# Things that look like credentials, in case a provider echoes one back in an error message.
_SECRET_LIKE = re.compile(r"(sk-|Bearer\s+)[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def provider_message(body: bytes, content_type: str) -> str:
    """The human part of an error body (`{"error": {"message": …}}` and friends); never HTML."""
    text = body.decode("utf-8", errors="replace")
    try:
        data: Any = json.loads(text)
    except ValueError:
        return one_line(text) if content_type.startswith("text/plain") else ""
    for key in ("error", "detail", "message"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("message") or value.get("detail")
        if isinstance(value, str) and value.strip():
            return one_line(value)
    return ""


def kind_for_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status == 408:
        return ErrorKind.TIMEOUT
    if status >= 500:
        return ErrorKind.SERVER
    if status >= 400:
        return ErrorKind.BAD_REQUEST
    return ErrorKind.MALFORMED  # 1xx/3xx/other 2xx surprises: not an answer


async def event_payloads(response: aiohttp.ClientResponse) -> AsyncIterator[list[str]]:
    """The `data` payloads of an event stream: a batch per network read, then what was left."""
    decoder = SSEDecoder()
    async for raw in response.content.iter_any():
        yield decoder.feed(raw)
    yield decoder.finish()


def kind_for_stream_error(error: dict[str, Any]) -> ErrorKind:
    """An error sent inside a 200 stream; providers only label it with a type/code string."""
    label = f"{error.get('type', '')} {error.get('code', '')}".lower()
    if "rate" in label or "quota" in label:
        return ErrorKind.RATE_LIMITED
    if "auth" in label or "api_key" in label or "permission" in label:
        return ErrorKind.AUTH
    if "invalid" in label or "context_length" in label:
        return ErrorKind.BAD_REQUEST
    return ErrorKind.SERVER


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """At most ERROR_BODY_LIMIT bytes of a failed response: enough for any provider message."""
    body = b""
    while len(body) < ERROR_BODY_LIMIT:
        part = await response.content.read(ERROR_BODY_LIMIT - len(body))
        if not part:
            break
        body += part
    return body


class HttpClient:
    """One backend spec's HTTP API: the session, retries with backoff, timeouts, status →
    ErrorKind and key redaction. `_call` makes one request-response exchange."""

    def __init__(
        self,
        spec: BackendSpec,
        http: aiohttp.ClientSession | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.spec = spec
        self._http = LazySession(http)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.log = log or logging.getLogger(type(self).__module__)

    async def close(self) -> None:
        await self._http.close()

    async def _backoff(self, error: BackendError, attempt: int) -> bool:
        """Wait before the next attempt and return True, or return False to give up now."""
        delay = self._retry_delay(error, attempt)
        if delay is None:
            return False
        self.log.warning(
            "backend %s: %s; retry %d/%d in %.1f s",
            self.spec.id,
            error,
            attempt + 1,
            self.spec.max_retries,
            delay,
        )
        await asyncio.sleep(delay)
        return True

    def _retry_delay(self, error: BackendError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if not error.retryable or attempt >= self.spec.max_retries:
            return None
        if error.retry_after is not None:
            # Waiting minutes in silence is worse than telling the user how long to wait.
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        backoff = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return backoff * random.uniform(0.75, 1.0)  # jitter: rooms hit by one outage spread out

    def _error(self, kind: ErrorKind, detail: str = "", **extra: Any) -> BackendError:
        """Every BackendError leaves through here, so the API key can never be in its text."""
        if self.spec.api_key:
            detail = detail.replace(self.spec.api_key, "***")
        detail = _SECRET_LIKE.sub(lambda m: m.group(1) + "***", detail)
        return BackendError(kind, detail, timeout_s=self.spec.timeout_s, **extra)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json"}
        if self.spec.api_key:
            headers["Authorization"] = f"Bearer {self.spec.api_key}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        limit = self.spec.timeout_s
        # sock_read bounds every wait for bytes (headers and each piece of the stream), so a
        # stalled provider times out even mid-answer; there is no cap on a steadily flowing one.
        return aiohttp.ClientTimeout(total=None, connect=limit, sock_read=limit)

    async def _post(
        self,
        url: str,
        body: dict[str, Any] | None = None,
        *,
        form: aiohttp.FormData | None = None,
        accept: str | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request (a JSON `body` or a multipart `form`; `accept` replaces the default
        Accept header); failures to get a response become BackendErrors."""
        limit = self.spec.timeout_s
        headers = self._headers()
        if accept is not None:
            headers["Accept"] = accept
        try:
            return await self._http.get().post(
                url, json=body, data=form, headers=headers, timeout=self._timeout()
            )
        except asyncio.TimeoutError:
            raise self._error(ErrorKind.TIMEOUT, f"no response within {limit:g} s") from None
        except aiohttp.ClientConnectorError as e:
            raise self._error(ErrorKind.UNREACHABLE, f"cannot connect: {e.os_error}") from None
        except aiohttp.ServerDisconnectedError:
            raise self._error(ErrorKind.SERVER, "the server closed the connection") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise self._error(ErrorKind.UNREACHABLE, f"{type(e).__name__}: {e}") from None

    async def _call(
        self,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
    ) -> T:
        """One exchange that is not a streamed answer, retrying what is worth retrying: `send`
        makes an attempt's request (afresh each time), `read` turns a 2xx response into T."""
        attempt = 0
        while True:
            try:
                return await self._exchange(send, read)
            except BackendError as error:
                if not await self._backoff(error, attempt):
                    raise
                attempt += 1

    async def _exchange(
        self,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
    ) -> T:
        response = await send()
        complete = False
        try:
            if not 200 <= response.status < 300:
                raise await self._status_error(response)
            result = await read(response)
            complete = True
            return result
        except asyncio.TimeoutError:
            raise self._error(
                ErrorKind.TIMEOUT, f"no answer within {self.spec.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as e:
            raise self._error(ErrorKind.SERVER, f"{type(e).__name__}: {e}") from None
        finally:
            if complete:
                response.release()
            else:
                response.close()  # also on cancellation: the server sees the hang-up

    async def _json_object(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        """A whole JSON object answer (a `read` for `_call`)."""
        try:
            data = json.loads(await response.read())
        except ValueError:
            raise self._error(ErrorKind.MALFORMED, "the answer was not JSON") from None
        if not isinstance(data, dict):
            raise self._error(ErrorKind.MALFORMED, "the answer was not a JSON object")
        return data

    async def _status_error(self, response: aiohttp.ClientResponse) -> BackendError:
        return self._error_for_body(response, await read_error_body(response))

    def _error_for_body(self, response: aiohttp.ClientResponse, body: bytes) -> BackendError:
        """The BackendError for a non-2xx response whose (start of the) body is `body`."""
        kind = kind_for_status(response.status)
        retry_after = None
        if kind is ErrorKind.RATE_LIMITED:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        detail = provider_message(body, response.content_type) or response.reason or ""
        return self._error(kind, detail, status=response.status, retry_after=retry_after)


class HttpBackend(HttpClient, Backend):
    """POST `url` with `_body(request)`; subclasses read the answer (`_read_events` for
    text/event-stream, `_read_json` for a server that ignored streaming). HttpClient's
    constructor sets `spec`, which is all Backend's own does."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Where a generation request is POSTed."""

    @abstractmethod
    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of one attempt (rebuilt for each, so an adapted retry can differ)."""

    @abstractmethod
    def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        """Chunks from a text/event-stream answer."""

    def _read_json(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        """Chunks from a whole `application/json` answer (a server that ignored stream=true)."""
        raise self._error(ErrorKind.MALFORMED, f"unexpected content type {response.content_type}")

    def _adapt_to(self, error: BackendError) -> bool:
        """True when the request was changed to avoid `error` and should go again at once."""
        return False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        attempt = 0
        while True:
            shown = False
            try:
                async with aclosing(self._attempt(request)) as chunks:
                    async for chunk in chunks:
                        shown = True
                        yield chunk
                return
            except BackendError as error:
                if not shown and self._adapt_to(error):
                    continue
                if shown or not await self._backoff(error, attempt):
                    raise
                attempt += 1

    async def _attempt(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """One HTTP request. The response is closed on every way out, including cancellation."""
        limit = self.spec.timeout_s
        response = await self._post(self.url, self._body(request))
        complete = False
        try:
            if not 200 <= response.status < 300:
                raise await self._status_error(response)
            if response.content_type == "text/event-stream":
                async for chunk in self._read_events(response):
                    yield chunk
            elif response.content_type == "application/json":
                async for chunk in self._read_json(response):
                    yield chunk
            else:
                raise self._error(
                    ErrorKind.MALFORMED, f"unexpected content type {response.content_type}"
                )
            complete = True
        except asyncio.TimeoutError:
            raise self._error(ErrorKind.TIMEOUT, f"the answer stalled for {limit:g} s") from None
        except aiohttp.ClientPayloadError:
            raise self._error(ErrorKind.SERVER, "the connection broke mid-answer") from None
        except aiohttp.ClientError as e:
            raise self._error(ErrorKind.SERVER, f"{type(e).__name__}: {e}") from None
        finally:
            if complete:
                response.release()
            else:
                response.close()  # drop the connection: the server sees the disconnect and stops

    def _stream_error(self, error: dict[str, Any]) -> BackendError:
        message = error.get("message")
        detail = one_line(message) if isinstance(message, str) else "error event in the stream"
        return self._error(kind_for_stream_error(error), detail)

    def _decode(self, payload: str) -> list[Any]:
        try:
            return [json.loads(payload)]
        except ValueError:
            pass
        # Servers that omit the blank line between events get their data lines joined: split back.
        try:
            return [json.loads(line) for line in payload.split("\n") if line.strip()]
        except ValueError:
            raise self._error(ErrorKind.MALFORMED, "an event was not valid JSON") from None
