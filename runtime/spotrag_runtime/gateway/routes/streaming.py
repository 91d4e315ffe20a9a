"""What the chat and RAG routes share: noticing a client that went away,
Server-Sent Events out, and a streamed answer collected into one response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.types import Message, Receive

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.errors import ClientClosedRequest
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


# Where the app puts the server's own ``send`` (``GatewayApp``): a response that has
# started through the middleware's send wrappers (they only watch for the start)
# writes its body there, a call per chunk instead of one per wrapper.
RAW_SEND = "spotrag.send"

# The headers of every streamed answer (as Starlette's StreamingResponse wrote them).
EVENT_STREAM_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


def event_stream_start() -> Message:
    """A streamed answer's ``http.response.start`` (a new one each time: middleware may add headers)."""
    return {"type": "http.response.start", "status": 200, "headers": list(EVENT_STREAM_HEADERS)}


class ClientWatch:
    """Notices the client going away while its request is served, with one
    task per request: the task waits for ``http.disconnect`` and cancels the
    task serving the request (the request's own, then the streamed answer's:
    ``serve``), which turns the cancellation back into ``ClientClosedRequest``
    where it awaits (``guard``, or the streamed answer's own loop). The
    serving task awaits its work itself: no task per step and no task group
    per response.

    Armed from construction to ``stop()``; the watching task ends by itself
    once the response is complete (uvicorn then answers ``receive`` with
    ``http.disconnect``) or the connection is gone. Create it after the
    request's body has been read: the next message can only be the disconnect.
    """

    __slots__ = ("_armed", "_task", "_watcher", "gone")

    def __init__(self, request: Request) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._armed = True
        self.gone = False
        self._watcher = task.get_loop().create_task(self._watch(request.receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._armed:
            self._armed = False
            self.gone = True
            self._task.cancel()

    def serve(self, task: asyncio.Task[Any]) -> None:
        """``task`` serves the request from now on (and is cancelled instead)."""
        self._task = task

    def stop(self) -> None:
        """No more cancelling: the answer is over (or on its way out)."""
        self._armed = False

    def cancelled_by_client(self) -> bool:
        """Called on a CancelledError in the serving task: True (and the
        cancellation taken back) when it is this watch's alone, False when
        something else cancelled the task too (a server shutting down)."""
        if not self.gone:
            return False
        self.gone = False
        return self._task.uncancel() == 0

    async def guard(self, work: Awaitable[T]) -> T:
        """Await ``work`` in the serving task; ClientClosedRequest if the client disconnects first."""
        try:
            return await work
        except asyncio.CancelledError:
            if self.cancelled_by_client():
                raise ClientClosedRequest("The client closed the connection.") from None
            raise


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + fastjson.dumps(payload) + b"\n\n"


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
