"""The gateway's long-lived parts, built once at start and wired together:
metrics, admission, the engine client and relay, retrieval and prompting,
engine discovery and API keys. Routes reach them through ``app.state.gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotrag_runtime.gateway.auth import APIKeyStore
from spotrag_runtime.gateway.config import GatewayConfig
from spotrag_runtime.gateway.discovery import Discovery, EndpointSliceDiscovery, StaticDiscovery
from spotrag_runtime.gateway.errors import (
    APIError,
    ClientClosedRequest,
    ContextTooLong,
    EngineRejected,
    EnginesFailed,
    InvalidRequest,
    NotFound,
    QueueFull,
    Unavailable,
)
from spotrag_runtime.gateway.metrics import GatewayMetrics
from spotrag_runtime.gateway.prompt import Context, PromptBuilder, last_user_question, message_text
from spotrag_runtime.gateway.relay import ChatJob, ChatRelay
from spotrag_runtime.gateway.retrieval_service import RetrievalService, RetrievedPassage
from spotrag_runtime.gateway.schemas import ChatCompletionRequest
from spotrag_runtime.gateway.token_queue import AdmissionController, prefix_keys
from spotrag_runtime.gateway.upstream import (
    EngineClient,
    EngineFailure,
    EngineRefused,
    PromptEstimator,
    estimate_prompt_tokens,
)

if TYPE_CHECKING:
    from spotrag_runtime.retrieval import Embedder

log = logging.getLogger(__name__)

# Fields of the client's request the gateway handles itself rather than forwarding.
_GATEWAY_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "rag", "stream", "stream_options"}
# tokenCounting auto asks the engine for an exact count only when the estimate
# times this, plus the answer's tokens, would not fit the context: the context
# errors and the trimming of passages stay exact, and no other request waits.
EXACT_COUNT_MARGIN = 1.5


@dataclass
class PreparedChat:
    job: ChatJob
    contexts: list[Context]


def outcome_of(error: BaseException | None) -> str:
    """The ``spotrag_requests_total`` outcome label for how a request ended."""
    if error is None:
        return "success"
    if isinstance(error, ClientClosedRequest):
        return "cancelled"
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, Unavailable):
        return "unavailable"
    if isinstance(error, EnginesFailed):
        return "engine_failed"
    if isinstance(error, APIError) and 400 <= error.status < 500:
        return "invalid"
    return "error"


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        embedder: Embedder | None = None,
        kubeconfig: str | None = None,
        workers: int = 1,
    ) -> None:
        """``workers`` > 1: this is one of that many worker processes of a pod
        (``config`` then holds this worker's share of the pod's limits), whose
        metrics add up in prometheus-client's multiprocess directory."""
        self.config = config
        self.workers = workers
        self.metrics = GatewayMetrics(multiprocess_workers=workers > 1)
        self._publisher: asyncio.Task[None] | None = None
        self.admission = AdmissionController(
            config.admission, engine_cooldown_seconds=config.failover.engine_cooldown_seconds
        )
        self.client = EngineClient(
            connect_timeout=config.failover.connect_timeout_seconds,
            read_timeout=config.failover.read_timeout_seconds,
        )
        self.estimator = PromptEstimator()
        self.relay = ChatRelay(
            admission=self.admission,
            client=self.client,
            failover=config.failover,
            metrics=self.metrics,
            estimator=self.estimator,
        )
        self.prompts = PromptBuilder(config.prompt)
        self.retrieval = (
            RetrievalService(config.retrieval, metrics=self.metrics, embedder=embedder)
            if config.retrieval.enabled
            else None
        )
        self.discovery: Discovery
        if config.engines.discovery == "endpointslices":
            self.discovery = EndpointSliceDiscovery(
                config.engines, namespace=config.namespace, on_change=self.admission.set_engines, kubeconfig=kubeconfig
            )
        else:
            self.discovery = StaticDiscovery(config.engines.urls, self.admission.set_engines)
        self.auth = APIKeyStore(config.auth.api_keys_dir) if config.auth.api_keys_dir else None
        live = self.metrics.live
        live.queued_tokens = lambda: self.admission.queued_tokens
        live.queued_prompt_tokens = lambda: self.admission.queued_prompt_tokens
        live.waiting_requests = lambda: self.admission.waiting_requests
        live.inflight_requests = lambda: self.admission.inflight_requests
        live.engine_inflight_tokens = self.admission.engine_inflight_tokens
        live.engines_by_state = self.admission.engines_by_state
        if self.retrieval is not None:
            live.index = self.retrieval.index_state

    async def start(self) -> None:
        await self.discovery.start()
        if self.retrieval is not None:
            await self.retrieval.start()
        if self.metrics.published is not None:
            self.metrics.forget_dead_workers()
            self._publisher = asyncio.create_task(self._publish_metrics())

    async def _publish_metrics(self) -> None:
        while True:
            self.metrics.publish()
            await asyncio.sleep(self.metrics.PUBLISH_SECONDS)

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self.metrics.worker_exited(os.getpid())
        await self.discovery.close()
        if self.retrieval is not None:
            await self.retrieval.close()
        await self.client.aclose()

    def readiness(self) -> list[str]:
        """Why the gateway is not ready; empty when it is."""
        problems = []
        if self.retrieval is not None and not self.retrieval.ready:
            problems.append("the document index is not loaded")
        if not self.discovery.synced:
            problems.append("engine discovery has not synced")
        elif not self.admission.engines and not self.config.admission.queue_without_engines:
            problems.append("no engine is serving")
        return problems

    def record(self, started: float, error: BaseException | None) -> None:
        self.metrics.requests.labels(outcome_of(error)).inc()
        self.metrics.request_duration.observe(time.perf_counter() - started)

    # --- preparing a request ---------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise NotFound(
                f"The model {model!r} does not exist; this endpoint serves {self.config.served_model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def check_max_tokens(self, requested: int | None) -> None:
        limit = self.config.max_tokens_limit
        if requested is not None and requested > limit:
            raise InvalidRequest(
                f"max_tokens is {requested}, above this endpoint's limit of {limit}.", param="max_tokens"
            )

    async def retrieve(
        self, question: str, *, top_k: int | None = None, score_threshold: float | None = None
    ) -> list[RetrievedPassage]:
        if self.retrieval is None:
            raise InvalidRequest("Retrieval is not enabled for this deployment.", param="rag")
        return await self.retrieval.search(question, top_k=top_k, score_threshold=score_threshold)

    async def prepare_chat(
        self,
        request: ChatCompletionRequest,
        *,
        rag: bool,
        passages: Sequence[RetrievedPassage] | None = None,
        arrived_at: float | None = None,
    ) -> PreparedChat:
        """Check the request, ground it in the documents (when ``rag``), count
        its prompt and fit it into the model's context. ``arrived_at``
        (``time.perf_counter()``) is where time to first token starts."""
        self.check_model(request.model)
        requested = request.requested_max_tokens
        self.check_max_tokens(requested)
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        question_at, question, contexts = 0, "", []
        if rag:
            question_at, question = last_user_question(messages)
            if passages is None:
                passages = await self.retrieve(question)
            contexts = self.prompts.contexts(passages)
            messages_out = self.prompts.messages(messages, question_at, question, contexts)
        else:
            messages_out = messages
        continuing = request.continue_final_message
        max_model_len = self.config.max_model_len
        answer_room = requested or self.config.default_max_tokens
        prompt_tokens, raw_estimate = await self.count_prompt_tokens(
            messages_out, continue_final_message=continuing, answer_room=answer_room
        )
        # Fewer passages rather than no answer: drop the lowest-ranked until it fits.
        while prompt_tokens + (requested or 1) > max_model_len and contexts:
            contexts = contexts[:-1]
            messages_out = self.prompts.messages(messages, question_at, question, contexts)
            prompt_tokens, raw_estimate = await self.count_prompt_tokens(
                messages_out, continue_final_message=continuing, answer_room=answer_room
            )
        if prompt_tokens + (requested or 1) > max_model_len:
            asked = f" plus max_tokens {requested}" if requested else ""
            raise ContextTooLong(
                f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens{asked}. Shorten the messages"
                + (" or lower max_tokens." if requested else "."),
                param="messages",
            )
        max_tokens = requested or min(self.config.default_max_tokens, max_model_len - prompt_tokens)
        body: dict[str, Any] = request.model_dump(exclude_unset=True, exclude=_GATEWAY_FIELDS)
        body["model"] = self.config.served_model_name
        affinity: tuple[bytes, ...] = ()
        if self.config.admission.prefix_affinity:
            affinity = prefix_keys("".join(f"{m['role']}\n{message_text(m.get('content'))}\n" for m in messages_out))
        job = ChatJob(
            body=body,
            messages=messages_out,
            prompt_tokens=prompt_tokens,
            prompt_estimate=raw_estimate,
            max_tokens=max_tokens,
            served_model=self.config.served_model_name,
            affinity=affinity,
            arrived_at=time.perf_counter() if arrived_at is None else arrived_at,
        )
        return PreparedChat(job, contexts)

    async def count_prompt_tokens(
        self, messages: list[dict[str, Any]], *, continue_final_message: bool, answer_room: int = 1
    ) -> tuple[int, int | None]:
        """(prompt tokens, the raw estimate they came from or None when exact).

        ``tokenCounting: auto`` estimates (calibrated by what engines reported
        before; the engine's first usage chunk corrects each request) unless
        the estimate with ``answer_room`` comes near the context limit; then,
        and always under ``engine``, the count is exact from an engine's
        /tokenize. Estimated when counting is set to estimate, no engine is
        known, or none of two engines could count."""
        counting = self.config.admission.token_counting
        if counting == "auto":
            estimate, raw = self.estimator.estimate(messages)
            if estimate * EXACT_COUNT_MARGIN + answer_room <= self.config.max_model_len:
                return estimate, raw
        if counting != "estimate":
            exact = await self._engine_count(messages, continue_final_message=continue_final_message)
            if exact is not None:
                return exact, None
        raw = estimate_prompt_tokens(messages)
        return raw, raw

    async def _engine_count(self, messages: list[dict[str, Any]], *, continue_final_message: bool) -> int | None:
        now = time.monotonic()
        # Engines passed over after a failure (or a refused connection) are asked last.
        engines = sorted(
            self.admission.engines.values(),
            key=lambda e: (e.cooldown_until > now, e.inflight_tokens, e.last_picked),
        )
        for engine in engines[:2]:
            try:
                return await self.client.count_prompt_tokens(
                    engine.url,
                    model=self.config.served_model_name,
                    messages=messages,
                    continue_final_message=continue_final_message,
                )
            except EngineFailure as failure:
                log.info("counting tokens on %s failed (%s); trying another way", engine.url, failure)
                if isinstance(failure, EngineRefused):
                    self.admission.mark_failed(engine)  # not serving: don't route there either
            except EngineRejected as rejected:
                if rejected.status != 404:  # 404: no /tokenize there; estimate instead
                    raise
        return None
