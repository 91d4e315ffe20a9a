"""``POST /v1/chat/completions``: OpenAI's chat API, grounded in the documents
unless the client says ``"rag": false`` (or sends ``X-Spotrag-Rag: off``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from spotrag_runtime.gateway.errors import APIError, ClientClosedRequest, InvalidRequest
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome
from spotrag_runtime.gateway.routes.streaming import (
    DONE,
    EventStreamResponse,
    collect,
    completion_body,
    sse,
    until_disconnect,
    usage_chunk,
)
from spotrag_runtime.gateway.schemas import ChatCompletionRequest
from spotrag_runtime.gateway.service import Gateway

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")

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
) -> JSONResponse | EventStreamResponse:
    gateway: Gateway = request.app.state.gateway
    started = time.perf_counter()
    rag = wants_rag(gateway, body.rag, x_spotrag_rag)
    prepared = await until_disconnect(request, gateway.prepare_chat(body, rag=rag, arrived_at=started))
    job, outcome = prepared.job, ChatOutcome()
    options = body.stream_options
    job.continuous_usage = bool(body.stream and options and options.continuous_usage_stats)
    chunks = gateway.relay.chunks(job, outcome)
    if not body.stream:
        await until_disconnect(request, collect(chunks))
        gateway.record(started, None)
        return JSONResponse(completion_body(job, outcome))
    # Wait for the first chunk before answering, so that a request no engine
    # could start gets a real status code (429, 503, 502) rather than a 200;
    # but past keepAliveSeconds (an engine starting from zero takes minutes)
    # answer, and keep the connection alive with SSE comments meanwhile.
    first_chunk = asyncio.ensure_future(anext(chunks))
    try:
        first = await until_disconnect(request, _within(first_chunk, gateway.config.admission.keep_alive_seconds))
    except BaseException:
        first_chunk.cancel()
        raise
    return EventStreamResponse(
        _events(
            gateway,
            job,
            outcome,
            first,
            chunks,
            started=started,
            include_usage=bool(options and options.include_usage),
            pending=None if first is not None else first_chunk,
        )
    )


async def _within(task: asyncio.Future[T], seconds: float) -> T | None:
    """The task's result if it comes within ``seconds`` (0: however long it takes);
    None when it has not yet (the task goes on)."""
    if seconds <= 0:
        return await task
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except TimeoutError:
        return None


async def _events(
    gateway: Gateway,
    job: ChatJob,
    outcome: ChatOutcome,
    first: list[bytes] | None,
    chunks: AsyncIterator[list[bytes]],
    *,
    started: float,
    include_usage: bool,
    pending: asyncio.Future[list[bytes]] | None = None,
) -> AsyncIterator[bytes]:
    """The answer's SSE bytes; with ``pending`` (the first chunk not there yet) a
    keep-alive comment every keepAliveSeconds until it is."""
    error: BaseException | None = None
    try:
        if pending is not None:
            keep_alive = gateway.config.admission.keep_alive_seconds
            while not pending.done():
                yield WAITING
                await asyncio.wait({pending}, timeout=keep_alive)
            first = pending.result()
        batch: list[bytes] | None = first
        while batch is not None:
            yield b"".join(batch)  # what arrived together leaves together
            batch = await anext(chunks, None)
        if include_usage:
            yield sse(usage_chunk(job, outcome))
        yield DONE
    except APIError as failure:
        error = failure
        yield failure.sse_event()  # the stream has started: the error goes inside it
    except Exception as failure:
        log.exception("chat stream %s failed", job.id)
        error = failure
        yield APIError("The gateway failed while streaming this answer; see its log.").sse_event()
    except BaseException:  # the client went away (GeneratorExit or cancellation)
        error = ClientClosedRequest("The client closed the connection.")
        raise
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await chunks.aclose()  # type: ignore[attr-defined]
        gateway.record(started, error)
