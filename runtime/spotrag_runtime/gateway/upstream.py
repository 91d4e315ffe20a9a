"""Talking to engines: one shared HTTP client, vLLM's ``/tokenize``, and chat
streams parsed incrementally from Server-Sent Events.

Failures are sorted by whether another engine could do better:

    EngineFailure       the engine is unreachable, answered 5xx/429, went
                        silent past the read timeout or broke its stream:
                        try another engine (or resume there)
    EngineRejected      the engine refused the request itself (4xx): another
                        engine would refuse it too, so the client gets it
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from spotrag_runtime.gateway.errors import EngineRejected
from spotrag_runtime.gateway.prompt import message_text

log = logging.getLogger(__name__)

# Requests per engine are bounded by admission, so the pool itself is not.
_POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=2048, keepalive_expiry=30)


class EngineFailure(Exception):
    """The engine could not serve this attempt; another engine may."""


class EngineClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None)
        self.http = httpx.AsyncClient(timeout=timeout, limits=_POOL_LIMITS)

    async def aclose(self) -> None:
        await self.http.aclose()

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
            response = await self.http.post(f"{engine_url}/tokenize", json=body)
        except httpx.HTTPError as error:
            raise EngineFailure(f"{engine_url}/tokenize: {error!r}") from error
        if response.status_code >= 500:
            raise EngineFailure(f"{engine_url}/tokenize answered {response.status_code}")
        if response.status_code >= 400:
            raise _rejected(response.status_code, response.content, engine_url)
        return int(response.json()["count"])

    async def stream_chat(self, engine_url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The engine's chunks, parsed one SSE event at a time, until ``[DONE]``.

        Closing the iterator early (the client went away) closes the
        connection, which makes vLLM abort the request and free its slot.
        """
        try:
            async with self.http.stream("POST", f"{engine_url}/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    content = await response.aread()
                    if response.status_code >= 500 or response.status_code == 429:
                        raise EngineFailure(f"{engine_url} answered {response.status_code}: {content[:200]!r}")
                    raise _rejected(response.status_code, content, engine_url)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise _stream_error(event["error"], engine_url)
                    yield event
        except httpx.HTTPError as error:
            raise EngineFailure(f"{engine_url}: {error!r}") from error
        except json.JSONDecodeError as error:
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


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """About four bytes of text per token, plus a few per message for the chat
    template: used when no engine can count (``tokenCounting: estimate``)."""
    total = 2
    for message in messages:
        total += 4 + math.ceil(len(message_text(message.get("content")).encode()) / 4)
    return total
