"""``POST /v1/chat/completions``: OpenAI's chat API, grounded in the documents
unless the client says ``"rag": false`` (or sends ``X-Spotrag-Rag: off``)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from spotrag_runtime.gateway.errors import APIError, ClientClosedRequest, InvalidRequest
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome
from spotrag_runtime.gateway.routes.streaming import (
    DONE,
    RAW_SEND,
    ClientWatch,
    ClientWriter,
    completion_body,
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
        if not body.stream:
            await watch.guard(gateway.relay.answer(job, outcome))
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
        watch,
        started=started,
        include_usage=bool(options and options.include_usage),
        keep_alive=gateway.config.admission.keep_alive_seconds,
    )


class ChatStream(Response):
    """A streamed answer, as a pure ASGI response (below Starlette's
    StreamingResponse: no task group per response, no async generator
    between the relay and the socket). The relay writes the answer to the
    client from the engine connection's callbacks (``ClientWriter``); this
    task only starts it and writes its end.

    The response starts with the first chunk, so that a request no engine
    could start gets a real status code (429, 503, 502: the error is raised to
    the app's error handlers, as the route's own errors are); but past
    keepAliveSeconds (an engine starting from zero takes minutes) it starts
    anyway, and keeps the connection alive with SSE comments until the first
    chunk (from a timer). Once the stream has started, an error goes inside it
    as one SSE event. A client that goes away (``ClientWatch``) cancels the
    answer at once, which drops the engine's connection and gives back the
    request's queued tokens.

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
        self.watch = watch
        self.started = started
        self.include_usage = include_usage
        self.keep_alive = keep_alive  # seconds (0: wait for the first chunk however long, silently)
        self.head = head  # sent before the first chunk, with it
        self._keep_alive_timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The answer is served from a task of its own, so that the client's
        # watch cancels it alone (cancelling the request's task cancels it too).
        writer = ClientWriter(send, scope.get(RAW_SEND, send), head=self.head)
        answer = asyncio.get_running_loop().create_task(self._respond(writer))
        self.watch.serve(answer)
        try:
            await answer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (current is not None and current.cancelling()) or not self.watch.gone:
                raise
            # The client left before the answer's task took its first step.
            self.watch.stop()
            raise ClientClosedRequest("The client closed the connection.") from None

    async def _respond(self, writer: ClientWriter) -> None:
        if self.keep_alive > 0:
            self._keep_alive_timer = asyncio.get_running_loop().call_later(self.keep_alive, self._keep_alive, writer)
        error: BaseException | None = None
        try:
            await self.gateway.relay.answer(self.job, self.outcome, writer)
            end = sse(usage_chunk(self.job, self.outcome)) + DONE if self.include_usage else DONE
        except BaseException as failure:
            client_left = isinstance(failure, asyncio.CancelledError) and self.watch.cancelled_by_client()
            if not writer.started:
                # Nothing sent yet: the app's error handlers answer with the real status.
                if client_left:
                    raise ClientClosedRequest("The client closed the connection.") from None
                raise
            if isinstance(failure, APIError):
                error = failure
                end = failure.sse_event()
            elif isinstance(failure, Exception):
                log.exception("chat stream %s failed", self.job.id)
                error = failure
                end = APIError("The gateway failed while streaming this answer; see its log.").sse_event()
            else:  # cancelled: the client went away, or the server is stopping
                error = ClientClosedRequest("The client closed the connection.")
                if not client_left:
                    raise
                end = None
        finally:
            if self._keep_alive_timer is not None:
                self._keep_alive_timer.cancel()
            self.watch.stop()
        try:
            if end is not None:
                await writer.finish(end)
        finally:
            self.gateway.record(self.started, error)

    def _keep_alive(self, writer: ClientWriter) -> None:
        """No chunk yet after keepAliveSeconds: start the response, and say so every keepAliveSeconds."""
        if writer.answering:
            return
        writer.comment(WAITING)
        self._keep_alive_timer = asyncio.get_running_loop().call_later(self.keep_alive, self._keep_alive, writer)
