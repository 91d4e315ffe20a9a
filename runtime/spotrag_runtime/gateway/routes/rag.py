"""``POST /v1/rag/query``: a question in; the answer and the passages it was
given out (number, id, score, text, source), so a UI can show citations.
``"generate": false`` returns the passages alone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from spotrag_runtime.gateway.prompt import Context
from spotrag_runtime.gateway.relay import ChatOutcome
from spotrag_runtime.gateway.routes.streaming import collect, until_disconnect
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


@router.post("/v1/rag/query")
async def rag_query(body: RagQueryRequest, request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    started = time.perf_counter()
    gateway.check_model(body.model)
    gateway.check_max_tokens(body.max_tokens)
    found = await until_disconnect(
        request, gateway.retrieve(body.question, top_k=body.top_k, score_threshold=body.score_threshold)
    )
    model = gateway.config.served_model_name
    if not body.generate:
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
        chat = ChatCompletionRequest(
            model=model,
            messages=[{"role": "user", "content": body.question}],
            max_tokens=body.max_tokens,
            **(body.model_extra or {}),
        )
    except ValidationError as error:  # a sampling option of the wrong shape
        raise RequestValidationError(error.errors()) from None
    prepared = await until_disconnect(request, gateway.prepare_chat(chat, rag=True, passages=found, arrived_at=started))
    outcome = ChatOutcome()
    await until_disconnect(request, collect(gateway.relay.chunks(prepared.job, outcome)))
    gateway.record(started, None)
    return {
        "id": prepared.job.id,
        "object": "rag.answer",
        "created": prepared.job.created,
        "model": model,
        "answer": outcome.text,
        "finish_reason": outcome.finish_reason,
        "passages": _passages(prepared.contexts),
        "usage": outcome.usage(prepared.job),
    }
