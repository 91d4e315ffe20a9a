"""``POST /v1/rag/query``: a question in; the answer and the passages it was
given out (number, id, score, text, source), so a UI can show citations.
``"generate": false`` returns the passages alone.

``"messages"`` carries a chat's earlier turns (the question is retrieved for
alone and asked after them). With ``"stream": true`` the answer comes as
Server-Sent Events: first one ``rag.passages`` event with the passages, then
the ``chat.completion.chunk`` events of ``/v1/chat/completions``, then
``[DONE]`` (the chat page reads this; errors and resumes as in chat).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from spotrag_runtime.gateway.prompt import Context
from spotrag_runtime.gateway.relay import ChatOutcome
from spotrag_runtime.gateway.routes.chat import ChatStream
from spotrag_runtime.gateway.routes.streaming import ClientWatch, sse
from spotrag_runtime.gateway.schemas import ChatCompletionRequest, RagQueryRequest
from spotrag_runtime.gateway.service import Gateway

router = APIRouter()


def passage_body(context: Context) -> dict[str, Any]:
    passage = context.passage.passage
    return {
        "number": context.number,
        "id": passage.id,
        "score": context.passage.score,
        "text": passage.text,
        "source": passage.source,
        "position": passage.position,
        "metadata": passage.metadata,
        "truncated": context.truncated,
    }


def _passages(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    return [passage_body(context) for context in contexts]


@router.post("/v1/rag/query", response_model=None)
async def rag_query(body: RagQueryRequest, request: Request) -> dict[str, Any] | ChatStream:
    gateway: Gateway = request.app.state.gateway
    started = time.perf_counter()
    gateway.check_model(body.model)
    gateway.check_max_tokens(body.max_tokens)
    watch = ClientWatch(request)
    try:
        return await _answer(gateway, body, watch, started)
    except BaseException:
        watch.stop()
        raise


async def _answer(
    gateway: Gateway, body: RagQueryRequest, watch: ClientWatch, started: float
) -> dict[str, Any] | ChatStream:
    found = await watch.guard(gateway.retrieve(body.question, top_k=body.top_k, score_threshold=body.score_threshold))
    model = gateway.config.served_model_name
    if not body.generate:
        watch.stop()
        gateway.record(started, None)
        return {
            "object": "rag.answer",
            "model": model,
            "answer": None,
            "finish_reason": None,
            "passages": _passages(gateway.prompts.contexts(found)),
            "usage": None,
        }
    try:
        history = [message.model_dump(exclude_none=True) for message in body.messages]
        chat = ChatCompletionRequest(
            model=model,
            messages=[*history, {"role": "user", "content": body.question}],
            max_tokens=body.max_tokens,
            **(body.model_extra or {}),
        )
    except ValidationError as error:  # a sampling option of the wrong shape
        raise RequestValidationError(error.errors()) from None
    prepared = await watch.guard(gateway.prepare_chat(chat, rag=True, passages=found, arrived_at=started))
    job, outcome = prepared.job, ChatOutcome()
    if body.stream:
        head = {
            "id": job.id,
            "object": "rag.passages",
            "created": job.created,
            "model": model,
            "passages": _passages(prepared.contexts),
        }
        options = body.stream_options
        # As in chat: the first chunk before the status, so a request that could not start gets a real one
        # (however long it takes: no keep-alive comments before the passages).
        return ChatStream(
            gateway,
            job,
            outcome,
            watch,
            started=started,
            include_usage=bool(options and options.include_usage),
            keep_alive=0,
            head=sse(head),
        )
    await watch.guard(gateway.relay.answer(job, outcome))
    watch.stop()
    gateway.record(started, None)
    return {
        "id": job.id,
        "object": "rag.answer",
        "created": job.created,
        "model": model,
        "answer": outcome.text,
        "finish_reason": outcome.finish_reason,
        "passages": _passages(prepared.contexts),
        "usage": outcome.usage(job),
    }
