"""The gateway's Prometheus metrics, one registry per gateway.

``spotrag_queued_tokens`` is what the operator scrapes to scale engines: keep
its name. Gauges that mirror live state (queued tokens, engines, the index)
are read from the state when scraped rather than updated on every token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

QUEUED_TOKENS = "spotrag_queued_tokens"
# Its two parts, which add up to it: the operator weighs them differently.
QUEUED_PROMPT_TOKENS = "spotrag_queued_prompt_tokens"
QUEUED_OUTPUT_TOKENS = "spotrag_queued_output_tokens"

# Request outcomes, the label values of spotrag_requests_total.
OUTCOMES = (
    "success",  # answered in full
    "invalid",  # refused as the client's mistake (4xx), including auth
    "queue_full",  # 429: the admission queue was full
    "unavailable",  # 503: no engine within the queue timeout, or the index not loaded
    "engine_failed",  # 502: every attempt failed
    "cancelled",  # the client went away first
    "error",  # a gateway bug (500)
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
_RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass(frozen=True)
class IndexState:
    version: str
    model: str
    passages: int


@dataclass
class LiveState:
    """Where the scrape-time gauges read from; the app fills these in at start."""

    queued_tokens: Callable[[], int] = lambda: 0
    queued_prompt_tokens: Callable[[], int] = lambda: 0
    waiting_requests: Callable[[], int] = lambda: 0
    engine_inflight_tokens: Callable[[], Mapping[str, int]] = dict
    engines_by_state: Callable[[], Mapping[str, int]] = dict
    index: Callable[[], IndexState | None] = lambda: None


class _LiveCollector(Collector):
    def __init__(self, state: LiveState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state
        yield GaugeMetricFamily(
            QUEUED_TOKENS,
            "Tokens of work admitted or waiting and not yet done: prompt tokens not yet prefilled "
            "plus output tokens still allowed by max_tokens (docs/gateway.md).",
            value=state.queued_tokens(),
        )
        total, prompt = state.queued_tokens(), state.queued_prompt_tokens()
        yield GaugeMetricFamily(
            QUEUED_PROMPT_TOKENS,
            "The prompt part of spotrag_queued_tokens: prompt tokens admitted or waiting and not yet prefilled.",
            value=prompt,
        )
        yield GaugeMetricFamily(
            QUEUED_OUTPUT_TOKENS,
            "The output part of spotrag_queued_tokens: output tokens still allowed by max_tokens.",
            value=total - prompt,
        )
        yield GaugeMetricFamily(
            "spotrag_waiting_requests",
            "Requests waiting in the admission queue for an engine.",
            value=state.waiting_requests(),
        )
        inflight = GaugeMetricFamily(
            "spotrag_engine_inflight_tokens",
            "Queued tokens of the requests admitted to each engine.",
            labels=["engine"],
        )
        for engine, tokens in sorted(state.engine_inflight_tokens().items()):
            inflight.add_metric([engine], tokens)
        yield inflight
        engines = GaugeMetricFamily("spotrag_engines", "Engines the gateway knows, by state.", labels=["state"])
        for engine_state, count in sorted(state.engines_by_state().items()):
            engines.add_metric([engine_state], count)
        yield engines
        index = state.index()
        yield GaugeMetricFamily(
            "spotrag_index_passages", "Passages in the loaded index.", value=index.passages if index else 0
        )
        info = GaugeMetricFamily(
            "spotrag_index_info",
            "The loaded index version and embedding model (always 1).",
            labels=["version", "model"],
        )
        if index:
            info.add_metric([index.version, index.model], 1)
        yield info


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.live = LiveState()
        self.registry.register(_LiveCollector(self.live))
        self.requests = Counter("spotrag_requests", "Requests by outcome.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.retries = Counter(
            "spotrag_retries",
            "Requests sent to another engine after one failed before the first token.",
            registry=self.registry,
        )
        self.resumed_streams = Counter(
            "spotrag_resumed_streams",
            "Answers continued on another engine after theirs broke mid-answer.",
            registry=self.registry,
        )
        self.stalled_streams = Counter(
            "spotrag_stalled_streams",
            "Engine streams given up because no token came within the stall bound (then resumed elsewhere).",
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "spotrag_time_to_first_token_seconds",
            "From request arrival to the first answer token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "spotrag_inter_token_latency_seconds",
            "Gap between consecutive answer chunks.",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "spotrag_request_duration_seconds",
            "From request arrival to its last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retrieval = Histogram(
            "spotrag_retrieval_seconds",
            "Retrieval time per question, by stage.",
            ["stage"],
            buckets=_RETRIEVAL_BUCKETS,
            registry=self.registry,
        )
        self.retrieval_embed = self.retrieval.labels("embed")
        self.retrieval_search = self.retrieval.labels("search")
        self.retrieval_batch_size = Histogram(
            "spotrag_retrieval_batch_size",
            "Questions embedded together in one micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
