"""``POST /v1/chat/completions``: OpenAI's chat API, grounded in the documents
unless the client says ``"rag": false`` (or sends ``X-Spotrag-Rag: off``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from spotrag_runtime.gateway.errors import APIError, ClientClosedRequest, InvalidRequest
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome
from spotrag_runtime.gateway.routes.streaming import (
    DONE,
    RAW_SEND,
    ClientWatch,
    collect,
    completion_body,
    event_stream_start,
    sse,
    usage_chunk,
)
from spotrag_runtime.gateway.schemas import ChatCompletionRequest
from spotrag_runtime.gateway.service import Gateway

log = logging.getLogger(__name__)
router = APIRouter()

# An SSE comment: clients ignore it, proxies see bytes and keep the connection.
WAITING = b": waiting for an engine\n\n"

RAG_HEADER_OFF = {"off", "false", "0", "no"}


def wants_rag(gateway: Gateway, asked: bool | None, header: str | None) -> bool:
    """The body's ``rag`` wins over the header; without either, retrieval is on
    wherever the deployment has it."""
    if asked is None:
        asked = gateway.retrieval is not None and (header is None or header.strip().lower() not in RAG_HEADER_OFF)
    if asked and gateway.retrieval is None:
        raise InvalidRequest("Retrieval is not enabled for this deployment.", param="rag")
    return asked


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    x_spotrag_rag: str | None = Header(default=None),
) -> JSONResponse | ChatStream:
    gateway: Gateway = request.app.state.gateway
    started = time.perf_counter()
    rag = wants_rag(gateway, body.rag, x_spotrag_rag)
    watch = ClientWatch(request)
    try:
        prepared = await watch.guard(gateway.prepare_chat(body, rag=rag, arrived_at=started))
        job, outcome = prepared.job, ChatOutcome()
        options = body.stream_options
        job.continuous_usage = bool(body.stream and options and options.continuous_usage_stats)
        chunks = gateway.relay.chunks(job, outcome)
        if not body.stream:
            await watch.guard(collect(chunks))
            watch.stop()
            gateway.record(started, None)
            return JSONResponse(completion_body(job, outcome))
    except BaseException:
        watch.stop()
        raise
    return ChatStream(
        gateway,
        job,
        outcome,
        chunks,
        watch,
        started=started,
        include_usage=bool(options and options.include_usage),
        keep_alive=gateway.config.admission.keep_alive_seconds,
    )


class ChatStream(Response):
    """A streamed answer, as a pure ASGI response (below Starlette's
    StreamingResponse: no task group per response, no async generator
    between the relay and the socket, the body written past the middleware's
    send wrappers once the response has started through them).

    It waits for the first chunk before answering, so that a request no
    engine could start gets a real status code (429, 503, 502: the error is
    raised to the app's error handlers, as the route's own errors are); but
    past keepAliveSeconds (an engine starting from zero takes minutes) it
    answers, and keeps the connection alive with SSE comments meanwhile (a
    task only then). Once the stream has started, an error goes inside it as
    one SSE event. A client that goes away (``ClientWatch``) cancels the
    wait at once; the relay is always closed before the response ends, which
    gives back the engine's slot and the request's queued tokens.

    A Response only so that FastAPI passes it through as one (no background
    tasks: the routes that return it take none)."""

    status_code = 200
    media_type = "text/event-stream"
    background = None

    def __init__(
        self,
        gateway: Gateway,
        job: ChatJob,
        outcome: ChatOutcome,
        chunks: AsyncIterator[list[bytes]],
        watch: ClientWatch,
        *,
        started: float,
        include_usage: bool,
        keep_alive: float,
        head: bytes = b"",
    ) -> None:
        self.gateway = gateway
        self.job = job
        self.outcome = outcome
        self.chunks = chunks
        self.watch = watch
        self.started = started
        self.include_usage = include_usage
        self.keep_alive = keep_alive  # seconds (0: wait for the first chunk however long, silently)
        self.head = head  # sent before the first chunk, with it
        self._send: Send | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._response_started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        # The answer is written from a task of its own: every chunk resumes the
        # task that awaits it through its whole stack of awaits, and the
        # request's own task is some thirty frames deep in the middleware.
        # (Cancelling the request's task cancels this one with it.)
        answer = asyncio.get_running_loop().create_task(self._respond(send, scope.get(RAW_SEND, send)))
        self.watch.serve(answer)
        try:
            await answer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (current is not None and current.cancelling()) or not self.watch.gone:
                raise
            # The client left before the answer's task took its first step.
            await self._close()
            raise ClientClosedRequest("The client closed the connection.") from None

    async def _respond(self, send: Send, body_send: Send) -> None:
        try:
            first, failure = await self._first_chunk()
        except BaseException as cancelled:  # while stopping the keep-alive comments
            first, failure = None, cancelled
        if failure is not None and not self._response_started:
            # Nothing sent yet: the app's error handlers answer with the real status.
            await self._close()
            if isinstance(failure, asyncio.CancelledError) and self.watch.cancelled_by_client():
                raise ClientClosedRequest("The client closed the connection.") from None
            raise failure
        await self._stream(send, body_send, first, failure)

    async def _first_chunk(self) -> tuple[list[bytes] | None, BaseException | None]:
        """(the first chunk or None at the end, None) or (None, what it raised);
        keep-alive comments meanwhile if it takes longer than keepAliveSeconds."""
        keep_alive = self.keep_alive
        timer = asyncio.get_running_loop().call_later(keep_alive, self._keep_alive) if keep_alive > 0 else None
        try:
            return await anext(self.chunks, None), None
        except BaseException as failure:
            return None, failure
        finally:
            if timer is not None:
                timer.cancel()
            if self._keeper is not None:
                self._keeper.cancel()
                await asyncio.wait({self._keeper})
                if not self._keeper.cancelled():
                    self._keeper.exception()  # a failed write: the stream's own writes will tell

    def _keep_alive(self) -> None:
        self._keeper = asyncio.get_running_loop().create_task(self._keep_writing())

    async def _keep_writing(self) -> None:
        assert self._send is not None
        await self._send(event_stream_start())
        self._response_started = True
        while True:
            await self._send({"type": "http.response.body", "body": WAITING, "more_body": True})
            await asyncio.sleep(self.keep_alive)

    async def _stream(
        self, send: Send, body_send: Send, batch: list[bytes] | None, failure: BaseException | None
    ) -> None:
        """The answer from its first chunk on (``failure``: what the first chunk's wait raised)."""
        chunks, watch = self.chunks, self.watch
        error: BaseException | None = None
        end: bytes | None = None
        try:
            if failure is not None:
                raise failure  # the keep-alive comments started the stream: the error goes inside it
            if not self._response_started:
                await send(event_stream_start())
            if self.head:
                batch = [self.head, *(batch or ())]
            while batch is not None:
                # What arrived together leaves together.
                await body_send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
                batch = await anext(chunks, None)
            end = sse(usage_chunk(self.job, self.outcome)) + DONE if self.include_usage else DONE
        except APIError as failure:
            error = failure
            end = failure.sse_event()
        except Exception as failure:
            log.exception("chat stream %s failed", self.job.id)
            error = failure
            end = APIError("The gateway failed while streaming this answer; see its log.").sse_event()
        except BaseException as failure:  # cancelled: the client went away, or the server is stopping
            error = ClientClosedRequest("The client closed the connection.")
            if not (isinstance(failure, asyncio.CancelledError) and watch.cancelled_by_client()):
                raise
        finally:
            await self._close()
            self.gateway.record(self.started, error)
        if end is not None:
            await body_send({"type": "http.response.body", "body": end, "more_body": False})

    async def _close(self) -> None:
        """The relay closed (the engine's slot and the queued tokens given back), the watch stopped."""
        self.watch.stop()
        await self.chunks.aclose()  # type: ignore[attr-defined]
