"""What the chat and RAG routes share: noticing a client that went away,
Server-Sent Events out, and a streamed answer collected into one response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.errors import ClientClosedRequest
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    # The body is read by now, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (so an
    engine stops generating for nobody)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedRequest("The client closed the connection.")
    return task.result()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + fastjson.dumps(payload) + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, also when the
    client disconnects mid-stream, so the upstream request is closed at once
    rather than whenever the garbage collector finds the generator."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


async def collect(chunks: AsyncIterator[list[bytes]]) -> None:
    """Run a stream to its end (the outcome holds the answer)."""
    async for _ in chunks:
        pass


def completion_body(job: ChatJob, outcome: ChatOutcome) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.served_model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        ],
        "usage": outcome.usage(job),
    }


def usage_chunk(job: ChatJob, outcome: ChatOutcome) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.served_model,
        "choices": [],
        "usage": outcome.usage(job),
    }
