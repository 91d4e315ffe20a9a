"""Talking to engines: keep-alive HTTP/1.1 connections pooled per engine,
vLLM's ``/tokenize``, and chat streams whose Server-Sent Events are handed
on from the connection's own callbacks as the bytes arrive.

Why no HTTP client library on this path: an answer is one network read and
one client write per token, for hundreds of streams at once, and every
client library (httpx, aiohttp) hands a streamed body to a task: each read
resolves a future, the event loop schedules the task, and the task resumes
through its stack of awaits before the bytes can move on. That machinery
was most of the gateway's CPU per answer (docs/benchmarks.md, issue 13).
Here an engine connection is an asyncio Protocol: ``data_received`` parses
the HTTP with httptools (the C parser uvicorn itself uses, llhttp), splits
the Server-Sent Events, and hands each read's events to a ``StreamReceiver``
(the relay), which writes them to the client in the same callback. A task
runs only per attempt (connecting, waiting for the end), not per token.
(httpx before that cost up to 3x the CPU of aiohttp, and aiohttp ~1 ms per
answer more than this; both measured with bench/gateway_bench.py.)

Failures are sorted by whether another engine could do better:

    EngineFailure       the engine is unreachable, answered 5xx/429, went
                        silent past the read timeout or broke its stream:
                        try another engine (or resume there)
      EngineRefused     nothing accepts connections there: vLLM refuses them
                        while it loads and from ~0.1 s after SIGTERM, so the
                        engine is not serving, rather than failing
    EngineRejected      the engine refused the request itself (4xx): another
                        engine would refuse it too, so the client gets it
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.errors import EngineRejected
from spotrag_runtime.gateway.prompt import message_text

log = logging.getLogger(__name__)

# How long to wait for the end of a body after [DONE] before giving up the connection.
_DRAIN_SECONDS = 1.0
# An idle pooled connection is not reused after this long: vLLM's uvicorn closes
# its own idle connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a request
# sent as it closes one would be lost with it.
_IDLE_REUSE_SECONDS = 4.0


class EngineFailure(Exception):
    """The engine could not serve this attempt; another engine may."""


class EngineRefused(EngineFailure):
    """The connection was refused (or the host unreachable): no request reached
    the engine, which is starting or shutting down rather than broken."""


class StreamReceiver(Protocol):
    """Where a chat stream's events go, from the connection's callbacks."""

    def events(self, batch: list[bytes]) -> None:
        """The events (the JSON after each ``data:``, unparsed) of one network read."""

    def ended(self, error: Exception | None) -> None:
        """The stream is over: ``[DONE]`` came (None), or how it failed."""


class EngineClient:
    """Connections to engines, pooled per engine (requests per engine are bounded by admission)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[str, list[_Connection]] = {}
        self._origins: dict[str, _Origin] = {}

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def stream_chat(self, engine_url: str, body: dict[str, Any], receiver: StreamReceiver) -> EngineStream:
        """Send a streamed chat request; its events go to ``receiver`` as they
        arrive (several in one read come as one list, so a gateway that falls
        behind catches up in one write to its client), and its end to
        ``receiver.ended``. Raises only if no connection could be had; closing
        the stream early (``EngineStream.close``) drops the connection, which
        makes vLLM abort the request and free its slot. Silence is the
        receiver's to time (it knows what the stream has done so far)."""
        connection = await self._connection(engine_url)
        stream = EngineStream(engine_url, receiver)
        connection.send(self._origin(engine_url).request(b"/v1/chat/completions", fastjson.dumps(body)), stream)
        return stream

    async def count_prompt_tokens(
        self, engine_url: str, *, model: str, messages: Sequence[dict[str, Any]], continue_final_message: bool
    ) -> int:
        """Prompt tokens as the engine counts them (its chat template applied)."""
        body = {
            "model": model,
            "messages": list(messages),
            "add_generation_prompt": not continue_final_message,
            "continue_final_message": continue_final_message,
        }
        status, content = await self._exchange(engine_url, b"/tokenize", fastjson.dumps(body))
        if status >= 500:
            raise EngineFailure(f"{engine_url}/tokenize answered {status}")
        if status >= 400:
            raise _rejected(status, content, engine_url)
        try:
            return int(fastjson.loads(content)["count"])
        except (ValueError, KeyError, TypeError) as error:  # orjson's JSONDecodeError is a ValueError
            raise EngineFailure(f"{engine_url}/tokenize answered {status} with no count: {content[:200]!r}") from error

    async def _exchange(self, engine_url: str, path: bytes, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one plain request."""
        connection = await self._connection(engine_url)
        response = _WholeResponse(f"{engine_url}{path.decode()}")
        connection.send(self._origin(engine_url).request(path, body), response)
        try:
            async with asyncio.timeout(self.read_timeout):
                return await response.done
        except TimeoutError:
            connection.close()
            raise EngineFailure(f"{engine_url}{path.decode()}: no answer in {self.read_timeout:g}s") from None

    def _origin(self, engine_url: str) -> _Origin:
        origin = self._origins.get(engine_url)
        if origin is None:
            origin = self._origins[engine_url] = _Origin(engine_url)
        return origin

    async def _connection(self, engine_url: str) -> _Connection:
        """An idle pooled connection to the engine, or a new one."""
        idle = self._idle.setdefault(engine_url, [])
        oldest_reusable = time.monotonic() - _IDLE_REUSE_SECONDS
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be timing out
            if connection.idle_since >= oldest_reusable and not connection.lost:
                return connection
            connection.close()
        origin = self._origin(engine_url)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(engine_url, idle), origin.host, origin.port, ssl=origin.ssl
                )
        except TimeoutError:
            raise EngineFailure(f"{engine_url}: no connection in {self.connect_timeout:g}s") from None
        except OSError as error:  # refused, unreachable, no such host
            raise EngineRefused(f"{engine_url}: {error!r}") from error
        return connection


class _Origin:
    """An engine's address, and the head of a request to it."""

    def __init__(self, engine_url: str) -> None:
        parts = urlsplit(engine_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineFailure(f"{engine_url}: not an http(s) URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.base_path = parts.path.rstrip("/").encode()
        self.host_header = parts.netloc.encode()

    def request(self, path: bytes, body: bytes) -> bytes:
        return (
            b"POST " + self.base_path + path + b" HTTP/1.1\r\nHost: " + self.host_header
            + b"\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip


class _Response:
    """What a connection tells the request it is serving (httptools' callbacks, and the connection's end)."""

    status = 0  # 0 until the status line has come
    connection: _Connection

    def head(self, status: int) -> None:
        self.status = status

    def body(self, data: bytes) -> None: ...

    def read_done(self) -> None:
        """The network read that brought the last body bytes has been parsed."""

    def complete(self) -> None:
        """The whole response has come."""

    def lost(self, error: EngineFailure) -> None:
        """The connection ended (or broke) before the response was complete."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an engine, one request at a time;
    back in the engine's idle list once a response is complete."""

    def __init__(self, engine_url: str, idle: list[_Connection]) -> None:
        self.engine_url = engine_url
        self.idle_list = idle
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: _Response | None = None
        self.delimited = False  # the response's body has a length, or chunks: it does not end with the connection
        self.lost = False
        self.idle_since = 0.0

    def send(self, request: bytes, response: _Response) -> None:
        assert self.transport is not None and self.response is None
        self.response = response
        self.delimited = False
        response.connection = self
        self.transport.write(request)

    def close(self) -> None:
        """Drop the connection (an engine drops the request it was serving)."""
        self.response = None
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes nobody asked for: this is no connection to reuse
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.close()
            response.lost(EngineFailure(f"{self.engine_url} sent a response that is not HTTP/1.1: {error}"))
            return
        if response is self.response:
            response.read_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        response, self.response = self.response, None
        if response is None:
            if self in self.idle_list:  # the engine closed an idle connection (or went away)
                self.idle_list.remove(self)
            return
        if response.status and not self.delimited:
            # HTTP/1.1 lets a body without a length or chunks end with the connection.
            response.read_done()
            response.complete()
        elif response.status:
            response.lost(EngineFailure(f"{self.engine_url}: the connection ended mid-response ({exc!r})"))
        else:
            # Nothing came back, so nothing was served: a connection the engine closed
            # as it began to shut down (vLLM closes idle ones ~0.1 s after SIGTERM).
            response.lost(EngineRefused(f"{self.engine_url}: the connection closed before an answer ({exc!r})"))

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.head(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.body(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        if self.parser.should_keep_alive() and not self.lost:
            self.idle_since = time.monotonic()
            self.idle_list.append(self)
        elif self.transport is not None:
            self.transport.close()
        if response is not None:
            response.read_done()
            response.complete()


class _WholeResponse(_Response):
    """A plain request's response, all of it: ``done`` holds (status, body)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.content = bytearray()
        self.done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    def body(self, data: bytes) -> None:
        self.content += data

    def complete(self) -> None:
        if not self.done.done():
            self.done.set_result((self.status, bytes(self.content)))

    def lost(self, error: EngineFailure) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class EngineStream(_Response):
    """One streamed chat response: its events to the receiver, one list per network read.

    An error event raises (it is parsed: the only events that are, here, are
    those that do not begin as a chunk does). After ``[DONE]`` the end of the
    body is still read, so that the connection goes back to the pool (one left
    unread is closed, and a new connection per answer costs both sides a
    handshake) — for up to _DRAIN_SECONDS."""

    def __init__(self, engine_url: str, receiver: StreamReceiver) -> None:
        self.engine_url = engine_url
        self.receiver: StreamReceiver | None = receiver
        self.pending = b""  # the start of a line whose end has not come yet
        self.batch: list[bytes] = []
        self.error_body = bytearray()
        self.done = False  # [DONE] has come

    def pause_reading(self) -> None:
        if self.connection.transport is not None:
            self.connection.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.connection.transport is not None:
            self.connection.transport.resume_reading()

    def close(self) -> None:
        """No more events wanted: the connection is dropped, unless the answer
        is complete and only the body's end is on its way."""
        self.receiver = None
        connection = self.connection
        if connection.response is not self:
            return
        if self.done:
            asyncio.get_running_loop().call_later(_DRAIN_SECONDS, self._drain_overdue)
        else:
            connection.close()

    def _drain_overdue(self) -> None:
        if self.connection.response is self:
            self.connection.close()

    def body(self, data: bytes) -> None:
        if self.status != 200:
            self.error_body += data
            return
        if self.done or self.receiver is None:
            return
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            event = line[5:].strip()
            if event == b"[DONE]":
                self.done = True
                return
            if not event.startswith(b'{"id":'):
                try:
                    parsed = fastjson.loads(event)
                except fastjson.JSONDecodeError as error:
                    self._end(EngineFailure(f"{self.engine_url} sent an event that is not JSON: {error}"))
                    return
                if isinstance(parsed, dict) and "error" in parsed:
                    self._end(_stream_error(parsed["error"], self.engine_url))
                    return
            self.batch.append(event)

    def read_done(self) -> None:
        receiver = self.receiver
        if receiver is None:
            return
        if self.batch:
            batch, self.batch = self.batch, []
            receiver.events(batch)
        if self.done:
            self._end(None)

    def complete(self) -> None:
        status = self.status
        if status == 200:
            self._end(None if self.done else EngineFailure(f"{self.engine_url} ended the stream without [DONE]"))
            return
        content = bytes(self.error_body)
        if status >= 500 or status == 429 or status < 400:
            self._end(EngineFailure(f"{self.engine_url} answered {status}: {content[:200]!r}"))
        else:
            self._end(_rejected(status, content, self.engine_url))

    def lost(self, error: EngineFailure) -> None:
        self._end(error)

    def _end(self, error: Exception | None) -> None:
        receiver, self.receiver = self.receiver, None
        batch, self.batch = self.batch, []
        if receiver is None:
            return
        if batch:  # the events before an error event in the same read are the answer's too
            receiver.events(batch)
        receiver.ended(error)


def _rejected(status: int, content: bytes, engine_url: str) -> EngineRejected:
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = content.decode(errors="replace")[:500] or f"status {status}"
    log.info("engine %s refused a request with %d: %s", engine_url, status, message)
    return EngineRejected(f"The engine refused the request: {message}", status=status)


def _stream_error(error: Any, engine_url: str) -> Exception:
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else str(error)
    if isinstance(code, int) and 400 <= code < 500:
        return EngineRejected(f"The engine refused the request: {message}", status=code)
    return EngineFailure(f"{engine_url} sent an error mid-stream: {message}")


class PromptEstimator:
    """Prompt tokens without a round trip: ``estimate_prompt_tokens`` scaled by
    what the engines have reported for earlier prompts of this gateway (the
    ``prompt_tokens`` of their first usage chunk), so the estimate follows the
    model's tokenizer and chat template after a few answers.

    ``learn`` keeps an exponentially weighted ratio of reported to estimated
    tokens; it starts at 1 (four bytes per token) and stays within [0.25, 4].
    """

    WEIGHT = 0.05  # each report moves the ratio by this share of its error

    def __init__(self) -> None:
        self.ratio = 1.0

    def estimate(self, messages: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """(the calibrated estimate, the raw one to ``learn`` from later)."""
        raw = estimate_prompt_tokens(messages)
        return max(1, round(raw * self.ratio)), raw

    def learn(self, raw: int, reported: int) -> None:
        if raw > 0 and reported > 0:
            ratio = self.ratio + self.WEIGHT * (reported / raw - self.ratio)
            self.ratio = min(max(ratio, 0.25), 4.0)


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """About four bytes of text per token, plus a few per message for the chat
    template: used when no engine can count (``tokenCounting: estimate``) and,
    calibrated by ``PromptEstimator``, for admission under ``tokenCounting: auto``."""
    total = 2
    for message in messages:
        total += 4 + math.ceil(len(message_text(message.get("content")).encode()) / 4)
    return total
