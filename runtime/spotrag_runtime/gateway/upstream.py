"""Talking to engines: one shared HTTP client session, vLLM's ``/tokenize``,
and chat streams split into their Server-Sent Events as the bytes arrive.

The client is aiohttp rather than httpx: on this hot path (one network read
and one write per token, hundreds of streams at once) httpx's pure-Python
HTTP/1.1 parsing and its connection pool, which rescans every connection
for every request, cost up to 3x the CPU per request and a quarter of the
throughput at 128 concurrent streams (measured with bench/gateway_bench.py;
see docs/benchmarks.md). aiohttp parses HTTP in C and pools connections per
host. For the same reason the events of a stream are handed on as bytes (the
relay reads only what it needs of them), and what is parsed is parsed with
orjson (``fastjson``).

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
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.errors import EngineRejected
from spotrag_runtime.gateway.prompt import message_text

log = logging.getLogger(__name__)


_JSON = {"Content-Type": "application/json"}
# How long to wait for the end of a body after [DONE] before giving up the connection.
_DRAIN_SECONDS = 1.0


class EngineFailure(Exception):
    """The engine could not serve this attempt; another engine may."""


class EngineRefused(EngineFailure):
    """The connection was refused (or the host unreachable): no request reached
    the engine, which is starting or shutting down rather than broken."""


class EngineClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._session is None:  # made in the running loop, on first use
            # Requests per engine are bounded by admission, so the pool itself is not.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

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
        try:
            async with self.http.post(f"{engine_url}/tokenize", data=fastjson.dumps(body), headers=_JSON) as response:
                content = await response.read()
        except aiohttp.ClientConnectorError as error:
            raise EngineRefused(f"{engine_url}/tokenize: {error!r}") from error
        except (TimeoutError, aiohttp.ClientError) as error:
            raise EngineFailure(f"{engine_url}/tokenize: {error!r}") from error
        if response.status >= 500:
            raise EngineFailure(f"{engine_url}/tokenize answered {response.status}")
        if response.status >= 400:
            raise _rejected(response.status, content, engine_url)
        return int(fastjson.loads(content)["count"])

    async def stream_chat(self, engine_url: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        """The engine's events (the JSON after each ``data:``, unparsed), until ``[DONE]``.

        An error event raises (it is parsed: the only events that are, here,
        are those that do not begin as a chunk does). Events that arrive in
        one network read come as one list, so a gateway
        that falls behind catches up in one write to its client instead of one
        per token. Closing the iterator early (the client went away) closes the
        connection, which makes vLLM abort the request and free its slot.
        """
        responded = False
        try:
            async with self.http.post(
                f"{engine_url}/v1/chat/completions", data=fastjson.dumps(body), headers=_JSON
            ) as response:
                responded = True
                if response.status >= 400:
                    content = await response.read()
                    if response.status >= 500 or response.status == 429:
                        raise EngineFailure(f"{engine_url} answered {response.status}: {content[:200]!r}")
                    raise _rejected(response.status, content, engine_url)
                pending = b""
                done = False
                content = response.content
                # readany() itself rather than iter_any(): one frame less to resume per read.
                while received := await content.readany():
                    *lines, pending = (pending + received).split(b"\n")
                    events = []
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue  # blank separators, comments, event names
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        if not data.startswith(b'{"id":'):
                            event = fastjson.loads(data)
                            if isinstance(event, dict) and "error" in event:
                                raise _stream_error(event["error"], engine_url)
                        events.append(data)
                    if events:
                        yield events
                    if done:
                        break
                if done:
                    # Read the body's end so the connection goes back to the pool:
                    # one left unread is closed, and a new connection per answer
                    # costs both sides a handshake.
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        async with asyncio.timeout(_DRAIN_SECONDS):
                            await response.read()
                    return
        except aiohttp.ClientConnectorError as error:
            raise EngineRefused(f"{engine_url}: {error!r}") from error
        except aiohttp.ServerDisconnectedError as error:
            if not responded:
                # A pooled connection the engine closed as it began to shut down (vLLM
                # closes idle ones ~0.1 s after SIGTERM): nothing was served there.
                raise EngineRefused(f"{engine_url}: {error!r}") from error
            raise EngineFailure(f"{engine_url}: {error!r}") from error
        except (TimeoutError, aiohttp.ClientError) as error:
            raise EngineFailure(f"{engine_url}: {error!r}") from error
        except fastjson.JSONDecodeError as error:
            raise EngineFailure(f"{engine_url} sent an event that is not JSON: {error}") from error
        raise EngineFailure(f"{engine_url} ended the stream without [DONE]")


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
