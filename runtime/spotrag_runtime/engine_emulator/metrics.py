"""vLLM's Prometheus metrics, under vLLM's names and labels, in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .config import EmulatorConfig
from .engine import Engine

LABELS = ("model_name", "engine")
# vLLM v1's bucket boundaries, so dashboards built for vLLM read the same.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value (for
    the request length histograms, bounded by max_model_len)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(float(value))
        exponent += 1


class EngineMetrics:
    """Implements the engine's observer interface and renders /metrics."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": config.served_model_name, "engine": "0"}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry).labels(**labels)

        self.num_requests_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        # No prefix cache is emulated: every prompt token is a query, none a hit.
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        # Observed once per finished request, as vLLM does (the operator reads its percentile).
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            one_two_five_buckets(config.max_model_len),
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=self.registry,
        )
        self.request_success = {reason: success.labels(**labels, finished_reason=reason) for reason in FINISH_REASONS}
        cache_info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ("block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching", "engine"),
            registry=self.registry,
        )
        cache_info.labels(
            engine="0",
            block_size=str(config.block_size),
            num_gpu_blocks=str(config.num_gpu_blocks),
            cache_dtype="auto",
            enable_prefix_caching="False",
        ).set(1)

    def bind(self, engine: Engine) -> None:
        """Read the gauges from the engine at scrape time, so they are never stale."""
        self.num_requests_running.set_function(lambda: engine.num_running)
        self.num_requests_waiting.set_function(lambda: engine.num_waiting)
        self.kv_cache_usage_perc.set_function(lambda: engine.kv_cache_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- EngineObserver --------------------------------------------------------

    def request_admitted(self, queue_time_s: float) -> None:
        self.queue_time.observe(queue_time_s)

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self.time_to_first_token.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)

    def tokens_generated(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def request_finished(self, finish_reason: str, e2e_s: float, prompt_tokens: int) -> None:
        self.request_success[finish_reason].inc()
        self.e2e_latency.observe(e2e_s)
        self.request_prompt_tokens.observe(prompt_tokens)

    def preempted(self) -> None:
        self.num_preemptions.inc()
