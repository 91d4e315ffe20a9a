"""The gateway's Prometheus metrics, one registry per gateway.

``spotrag_queued_tokens`` is what the operator scrapes to scale engines: keep
its name. Gauges that mirror live state (queued tokens, engines, the index)
are read from the state when scraped rather than updated on every token.

With several worker processes in one pod (``spotrag gateway --workers N``),
a scrape reaches one of them, so the pod's numbers are aggregated in
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
the command): counters and histograms add up over the workers, and each
worker publishes its live state every ``PUBLISH_SECONDS`` into gauges that
are summed over the live workers (``livesum``; the engines and the index,
which every worker sees alike, are their ``livemax``). The pod's queued
tokens are then exact to within one publishing interval.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
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
    inflight_requests: Callable[[], int] = lambda: 0
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
        yield GaugeMetricFamily(
            "spotrag_inflight_requests",
            "Requests admitted to an engine or waiting for one (a gateway HPA's per-pod target).",
            value=state.inflight_requests(),
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


class _PublishedLiveState:
    """The live state as multiprocess gauges, for a pod of several workers."""

    def __init__(self, state: LiveState, registry: CollectorRegistry) -> None:
        self._state = state
        # The same names and help as _LiveCollector's; livesum adds up the live workers.
        families = {family.name: family.documentation for family in _LiveCollector(LiveState()).collect()}

        def gauge(name: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, families[name], labels, multiprocess_mode=mode, registry=registry)

        self.queued = gauge(QUEUED_TOKENS, "livesum")
        self.queued_prompt = gauge(QUEUED_PROMPT_TOKENS, "livesum")
        self.queued_output = gauge(QUEUED_OUTPUT_TOKENS, "livesum")
        self.waiting = gauge("spotrag_waiting_requests", "livesum")
        self.inflight_requests = gauge("spotrag_inflight_requests", "livesum")
        self.inflight = gauge("spotrag_engine_inflight_tokens", "livesum", ("engine",))
        self.engines = gauge("spotrag_engines", "livemax", ("state",))
        self.passages = gauge("spotrag_index_passages", "livemax")
        self.index_info = gauge("spotrag_index_info", "livemax", ("version", "model"))
        self._engines_seen: set[str] = set()
        self._index_seen: tuple[str, str] | None = None

    def publish(self) -> None:
        state = self._state
        total, prompt = state.queued_tokens(), state.queued_prompt_tokens()
        self.queued.set(total)
        self.queued_prompt.set(prompt)
        self.queued_output.set(total - prompt)
        self.waiting.set(state.waiting_requests())
        self.inflight_requests.set(state.inflight_requests())
        inflight = state.engine_inflight_tokens()
        for engine in self._engines_seen - inflight.keys():
            self.inflight.labels(engine).set(0)  # gone from this worker: counts nothing here
        for engine, tokens in inflight.items():
            self.inflight.labels(engine).set(tokens)
        self._engines_seen = set(inflight)
        for engine_state, count in state.engines_by_state().items():
            self.engines.labels(engine_state).set(count)
        index = state.index()
        self.passages.set(index.passages if index else 0)
        seen = (index.version, index.model) if index else None
        if seen != self._index_seen:
            if self._index_seen is not None:
                self.index_info.labels(*self._index_seen).set(0)
            if seen is not None:
                self.index_info.labels(*seen).set(1)
            self._index_seen = seen


def multiprocess_dir() -> str | None:
    """Where the workers of a pod share their metrics, when there are several."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    # How often a worker of several publishes its live state (queued tokens...).
    PUBLISH_SECONDS = 0.25

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess_workers: bool = False) -> None:
        self.live = LiveState()
        self.published: _PublishedLiveState | None = None
        if multiprocess_workers:
            # Scrapes read every worker's files; the metrics below write this worker's.
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
            own = CollectorRegistry()
            self.published = _PublishedLiveState(self.live, own)
        else:
            self.registry = registry or CollectorRegistry()
            self.registry.register(_LiveCollector(self.live))
            own = self.registry
        self.requests = Counter("spotrag_requests", "Requests by outcome.", ["outcome"], registry=own)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.retries = Counter(
            "spotrag_retries",
            "Requests sent to another engine after one failed before the first token.",
            registry=own,
        )
        self.resumed_streams = Counter(
            "spotrag_resumed_streams",
            "Answers continued on another engine after theirs broke mid-answer.",
            registry=own,
        )
        self.stalled_streams = Counter(
            "spotrag_stalled_streams",
            "Engine streams given up because no token came within the stall bound (then resumed elsewhere).",
            registry=own,
        )
        self.slow_client_pauses = Counter(
            "spotrag_slow_client_pauses",
            "Times an engine's stream was paused because its client was not reading the answer as fast as it came "
            "(the engine slot stays held meanwhile).",
            registry=own,
        )
        self.time_to_first_token = Histogram(
            "spotrag_time_to_first_token_seconds",
            "From request arrival to the first answer token.",
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.inter_token_latency = Histogram(
            "spotrag_inter_token_latency_seconds",
            "Gap between consecutive answer chunks.",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=own,
        )
        self.request_duration = Histogram(
            "spotrag_request_duration_seconds",
            "From request arrival to its last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.retrieval = Histogram(
            "spotrag_retrieval_seconds",
            "Retrieval time per question, by stage.",
            ["stage"],
            buckets=_RETRIEVAL_BUCKETS,
            registry=own,
        )
        self.retrieval_embed = self.retrieval.labels("embed")
        self.retrieval_search = self.retrieval.labels("search")
        self.retrieval_batch_size = Histogram(
            "spotrag_retrieval_batch_size",
            "Questions embedded together in one micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=own,
        )

    def publish(self) -> None:
        """Write this worker's live state for the pod's scrape (several workers only)."""
        if self.published is not None:
            self.published.publish()

    @staticmethod
    def worker_exited(pid: int) -> None:
        """Drop a worker's live gauges from the pod's sums."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(pid)

    @classmethod
    def forget_dead_workers(cls) -> None:
        """Drop the live gauges of workers that died without saying so (a
        replaced worker would otherwise count its last queued tokens forever)."""
        path = multiprocess_dir()
        if path is None:
            return
        for name in os.listdir(path):
            if not name.startswith("gauge_live"):
                continue
            pid = name.rsplit("_", 1)[-1].removesuffix(".db")
            if pid.isdigit() and not _alive(int(pid)):
                cls.worker_exited(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
