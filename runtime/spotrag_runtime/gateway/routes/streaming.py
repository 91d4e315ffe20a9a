"""What the chat and RAG routes share: noticing a client that went away,
writing a streamed answer (Server-Sent Events) from the relay's callbacks,
and the body of an answer for a client that did not stream."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

from fastapi import Request
from starlette.types import Message, Receive, Send

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


class ClientWriter:
    """Writes a streamed answer to the client from the engine connection's
    callbacks (the relay's ``ClientSink``), with no task step per write.

    An ASGI ``send`` is a coroutine, but a server's returns without waiting
    while the client keeps up (uvicorn's waits only when the socket's buffer
    is full), so the writer runs it at once, in the caller's callback
    (``_send_now``); only a send that does wait is finished in a task, held in
    ``blocked`` until it is done: the relay pauses the engine's reads
    meanwhile, and writes in between are queued, in order.

    The response starts (``send``, through the middleware) with the first
    write, ``head`` (bytes that go before the answer) first; the body goes to
    ``body_send`` (the server's own send: ``RAW_SEND``)."""

    __slots__ = ("answering", "blocked", "body_send", "head", "queued", "send", "started")

    def __init__(self, send: Send, body_send: Send, *, head: bytes = b"") -> None:
        self.send = send
        self.body_send = body_send
        self.head = head
        self.started = False  # the response has started
        self.answering = False  # the answer's chunks have started
        self.blocked: asyncio.Task[None] | None = None
        self.queued: list[bytes] = []

    def write(self, chunks: list[bytes]) -> None:
        """Chunks of the answer."""
        self.answering = True
        self._write(chunks)

    def comment(self, comment: bytes) -> None:
        """An SSE comment (the keep-alive while no chunk has come)."""
        self._write([comment])

    def _write(self, chunks: list[bytes]) -> None:
        if self.blocked is not None:
            self.queued.extend(chunks)
            return
        if not self.started:
            self.started = True
            chunks = [self.head, *chunks]
            self._send_now(self.send, event_stream_start())
            if self.blocked is not None:
                self.queued.extend(chunks)
                return
        # What arrived together leaves together.
        self._send_now(self.body_send, {"type": "http.response.body", "body": b"".join(chunks), "more_body": True})

    async def finish(self, end: bytes) -> None:
        """The last bytes, once every write before them is out; the response ends."""
        if not self.started:
            self._write([])
        while self.blocked is not None:
            await self.blocked
        await self.body_send({"type": "http.response.body", "body": end, "more_body": False})

    def _send_now(self, send: Send, message: Message) -> None:
        sending = send(message)
        try:
            waiting_on = sending.send(None)
        except StopIteration:
            return
        # It waits for the client: the rest of it in a task, and nothing else meanwhile.
        self.blocked = asyncio.get_running_loop().create_task(_finish_sending(sending, waiting_on))
        self.blocked.add_done_callback(self._unblocked)

    def _unblocked(self, task: asyncio.Task[None]) -> None:
        self.blocked = None
        if task.cancelled() or task.exception() is not None:
            self.queued = []  # the client is gone, or the server failed it: the answer's end will tell
            return
        if self.queued:
            queued, self.queued = self.queued, []
            self._write(queued)


async def _finish_sending(sending: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Run a coroutine that has already taken its first step, from where it waits."""
    await _Resumed(sending, waiting_on)


class _Resumed:
    """An awaitable over a coroutine already started (``coroutine.send(None)``
    returned ``waiting_on``): the awaiting task waits on what the coroutine
    waits on, then steps it on, as it would have stepped it itself."""

    __slots__ = ("coroutine", "waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self.coroutine = coroutine
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, Any]:
        waiting_on = self.waiting_on
        while True:
            try:
                yield waiting_on
            except BaseException as error:  # the task was cancelled: so is the coroutine
                step = functools.partial(self.coroutine.throw, error)
            else:
                step = functools.partial(self.coroutine.send, None)
            try:
                waiting_on = step()
            except StopIteration as stop:
                return stop.value


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + fastjson.dumps(payload) + b"\n\n"


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
