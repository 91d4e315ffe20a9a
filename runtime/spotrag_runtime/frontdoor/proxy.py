"""Calling a gateway and relaying its answer.

Without output moderation the answer's bytes are relayed as they arrive,
never parsed. With it, a stream is read event by event: events are held
until the answer text they carry fills a window (``windowChars``), the
window is checked, and only then are they sent on; a blocked window is never
sent: the stream ends with an OpenAI-style error event (code
``content_filter``) and ``[DONE]``, and the gateway's request is closed, so
it stops generating. A non-streamed answer is checked whole.

The upstream client is aiohttp: it parses HTTP in C and pools connections
per host (httpx's pure-Python parsing cost the gateway up to 3x the CPU per
answer; docs/benchmarks.md). The gateway's relay to engines goes one step
further, with a connection protocol of its own that relays from its
callbacks (gateway/upstream.py); the front door has not been measured as
the limit of a deployment, so it keeps the library.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.moderation import Moderator, Verdict

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class Upstream:
    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made in the running loop, on first use
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        return await self.session.post(url, data=body, headers=headers)


def answer_text(body: dict[str, Any]) -> str:
    """The answer text of a non-streamed response (chat, completions or RAG query)."""
    if isinstance(body.get("answer"), str):
        return body["answer"]
    parts = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        parts.append(message.get("content") or choice.get("text") or "")
    return "".join(parts)


def _delta_text(event: bytes) -> str:
    """The answer text an SSE event carries ("" for anything else)."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return ""
        try:
            chunk = fastjson.loads(data)
        except fastjson.JSONDecodeError:
            return ""
        parts = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or choice.get("text") or "")
        return "".join(parts)
    return ""


async def moderated_events(
    chunks: AsyncIterator[bytes],
    moderator: Moderator,
    *,
    on_verdict: Callable[[Verdict], None],
) -> AsyncIterator[bytes]:
    """Relay an SSE answer window by window; see the module's docstring."""
    window_chars = moderator.config.window_chars
    buffer = b""
    held: list[bytes] = []
    answer, window = "", ""
    blocked = Verdict()

    async def check() -> bytes | None:
        """The held events if the window passes; None if it was blocked."""
        nonlocal held, window, blocked
        verdict = await moderator.check_output(answer, window)
        on_verdict(verdict)
        if verdict.blocked:
            blocked = verdict
            return None
        out, held, window = b"".join(held), [], ""
        return out

    async for data in chunks:
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for raw in events:
            if not raw.strip():
                continue
            event = raw + b"\n\n"
            if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
                continue  # sent after the last window passes
            text = _delta_text(raw)
            held.append(event)
            if text:
                answer += text
                window += text
                if len(window) >= window_chars:
                    out = await check()
                    if out is None:
                        yield blocked.error("output").sse_event()
                        return
                    yield out
            elif not window:
                # Nothing unchecked is held: role chunks, usage, errors go on at once.
                yield b"".join(held)
                held = []
    if buffer.strip():
        held.append(buffer)
    if window:
        out = await check()
        if out is None:
            yield blocked.error("output").sse_event()
            return
        yield out
    elif held:
        yield b"".join(held)
    yield DONE
