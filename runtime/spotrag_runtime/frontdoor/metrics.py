"""The front door's Prometheus metrics, labelled by model and variant (the
RAGDeployment "namespace/name" that answered), so an A/B split reads off a
dashboard: each variant's traffic, latency, errors and moderation outcomes.

Requests that name no served model are counted with empty labels, so
whatever clients send cannot grow the label sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spotrag_runtime.frontdoor.routing import RouteTable

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)


class _RoutesCollector(Collector):
    def __init__(self, table: Callable[[], RouteTable]) -> None:
        self._table = table

    def collect(self) -> Iterable[Metric]:
        table = self._table()
        share = GaugeMetricFamily(
            "spotrag_frontdoor_variant_share",
            "Share of a model's traffic each variant is meant to get (weight / sum of weights).",
            labels=["model", "variant"],
        )
        problems = GaugeMetricFamily(
            "spotrag_frontdoor_route_problems",
            "Problems found in the RAGDeployments and ModelRoutes served (see /v1/models).",
            value=len(table.problems),
        )
        for model, route in sorted(table.routes.items()):
            for variant, value in sorted(route.shares().items()):
                share.add_metric([model, variant], value)
        yield share
        yield problems
        yield GaugeMetricFamily("spotrag_frontdoor_models", "Model names served.", value=len(table.routes))


class FrontDoorMetrics:
    def __init__(self, table: Callable[[], RouteTable], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(_RoutesCollector(table))
        self.requests = Counter(
            "spotrag_frontdoor_requests",
            "Requests by model, variant and HTTP status; a started stream cut by moderation counts as "
            "'content_filter', one that broke as 'stream_error', one whose client left as '499'.",
            ["model", "variant", "code"],
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "spotrag_frontdoor_time_to_first_byte_seconds",
            "From request arrival to the first byte of the answer (for a stream: its first token).",
            ["model", "variant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "spotrag_frontdoor_request_duration_seconds",
            "From request arrival to the last byte of the answer.",
            ["model", "variant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "spotrag_frontdoor_inflight_requests",
            "Requests being answered now.",
            ["model", "variant"],
            registry=self.registry,
        )
        self.moderation = Counter(
            "spotrag_frontdoor_moderation",
            "Moderation checks by stage (input, output) and outcome (allowed, redacted, blocked, checker_error).",
            ["model", "variant", "stage", "outcome", "reason"],
            registry=self.registry,
        )
