"""Queued tokens, the signal the autoscaler scales on, read where it is
defined: the gateways (docs/gateway.md). Either scraped from each ready
gateway pod's /metrics, or from Prometheus when `scaling.prometheus` is set.

Anything short of a complete reading returns None with the reason: the
autoscaler then holds the current size (it must never scale to the minimum
because a scrape failed).

`read_queued_work` reads the same gauge with its prompt and output parts and
the requests waiting in the gateways, for sizing to the SLO; a gateway too old
to export the parts gives a reading without them (the autoscaler says so and
falls back), not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from spotrag_runtime.kube import Kube, label_selector

from . import render

METRIC = "spotrag_queued_tokens"
PROMPT_METRIC = "spotrag_queued_prompt_tokens"
OUTPUT_METRIC = "spotrag_queued_output_tokens"
WAITING_METRIC = "spotrag_waiting_requests"
TTFT_BUCKETS = "spotrag_time_to_first_token_seconds_bucket"


@dataclass(frozen=True)
class QueuedWork:
    """Summed over the gateways. The parts are None when any gateway lacks them."""

    tokens: float
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    waiting_requests: float | None = None
    ttft_buckets: dict[str, float] | None = None  # the gateways' cumulative TTFT histogram, {le: count}


def parse_gateway(text: str) -> QueuedWork | None:
    """One gateway's /metrics → its QueuedWork (None without spotrag_queued_tokens)."""
    values: dict[str, float] = {}
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (METRIC, PROMPT_METRIC, OUTPUT_METRIC, WAITING_METRIC):
                values[sample.name] = float(sample.value)
            elif sample.name == TTFT_BUCKETS:
                buckets[sample.labels["le"]] = buckets.get(sample.labels["le"], 0.0) + float(sample.value)
    if METRIC not in values:
        return None
    return QueuedWork(
        tokens=values[METRIC],
        prompt_tokens=values.get(PROMPT_METRIC),
        output_tokens=values.get(OUTPUT_METRIC),
        waiting_requests=values.get(WAITING_METRIC),
        ttft_buckets=buckets or None,
    )


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def sum_work(readings: list[QueuedWork]) -> QueuedWork:
    total = QueuedWork(tokens=0.0, prompt_tokens=0.0, output_tokens=0.0, waiting_requests=0.0, ttft_buckets={})
    for r in readings:
        buckets = None
        if total.ttft_buckets is not None and r.ttft_buckets is not None:
            buckets = {le: total.ttft_buckets.get(le, 0.0) + r.ttft_buckets.get(le, 0.0) for le in r.ttft_buckets}
        total = QueuedWork(
            tokens=total.tokens + r.tokens,
            prompt_tokens=_add(total.prompt_tokens, r.prompt_tokens),
            output_tokens=_add(total.output_tokens, r.output_tokens),
            waiting_requests=_add(total.waiting_requests, r.waiting_requests),
            ttft_buckets=buckets,
        )
    return total


def _ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    return not pod["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def parse_gauge(text: str, name: str = METRIC) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def _scrape_gateways(kube: Kube, http: httpx.Client, body: dict) -> tuple[list[QueuedWork] | None, str]:
    namespace = body["metadata"]["namespace"]
    pods = [
        p
        for p in kube.list("v1", "Pod", namespace, label_selector=label_selector(render.gateway_selector(body)))
        if _ready(p)
    ]
    if not pods:
        return None, "no ready gateway to read queued tokens from"
    readings = []
    for pod in pods:
        ip = pod["status"].get("podIP")
        name = pod["metadata"]["name"]
        if not ip:
            return None, f"gateway {name} has no address yet"
        try:
            response = http.get(f"http://{ip}:{render.GATEWAY_PORT}/metrics", timeout=2.0)
            response.raise_for_status()
            reading = parse_gateway(response.text)
        except (httpx.HTTPError, ValueError) as error:
            return None, f"could not scrape gateway {name}: {error}"
        if reading is None:
            return None, f"gateway {name} exports no {METRIC}"
        readings.append(reading)
    return readings, ""


def from_gateways(kube: Kube, http: httpx.Client, body: dict) -> tuple[float | None, str]:
    readings, problem = _scrape_gateways(kube, http, body)
    return (None, problem) if readings is None else (sum(r.tokens for r in readings), "")


def work_from_gateways(kube: Kube, http: httpx.Client, body: dict) -> tuple[QueuedWork | None, str]:
    readings, problem = _scrape_gateways(kube, http, body)
    return (None, problem) if readings is None else (sum_work(readings), "")


def default_query(body: dict, metric: str = METRIC) -> str:
    meta = body["metadata"]
    return f'sum({metric}{{namespace="{meta["namespace"]}",pod=~"{meta["name"]}-gateway-.*"}})'


def from_prometheus(
    http: httpx.Client, body: dict, prometheus: dict, *, metric: str = METRIC
) -> tuple[float | None, str]:
    query = prometheus.get("query") if metric == METRIC and prometheus.get("query") else default_query(body, metric)
    try:
        response = http.get(f"{prometheus['url'].rstrip('/')}/api/v1/query", params={"query": query}, timeout=5.0)
        response.raise_for_status()
        result = response.json()["data"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        return None, f"Prometheus query failed: {error}"
    if not result:
        return None, f"Prometheus returned no data for {query}"
    try:
        return float(result[0]["value"][1]), ""
    except (KeyError, IndexError, TypeError, ValueError):
        return None, f"Prometheus answered {query} with an unexpected result"


def read_queued_tokens(kube: Kube, http: httpx.Client, body: dict, spec: dict) -> tuple[float | None, str]:
    prometheus = spec["scaling"].get("prometheus")
    return from_prometheus(http, body, prometheus) if prometheus else from_gateways(kube, http, body)


def read_queued_work(kube: Kube, http: httpx.Client, body: dict, spec: dict) -> tuple[QueuedWork | None, str]:
    """Queued tokens with their prompt and output parts and the gateways' waiting requests.
    From Prometheus the parts are their default sums (None when Prometheus has none)."""
    prometheus = spec["scaling"].get("prometheus")
    if not prometheus:
        return work_from_gateways(kube, http, body)
    total, problem = from_prometheus(http, body, prometheus)
    if total is None:
        return None, problem
    parts = {
        m: from_prometheus(http, body, prometheus, metric=m)[0] for m in (PROMPT_METRIC, OUTPUT_METRIC, WAITING_METRIC)
    }
    return QueuedWork(
        tokens=total,
        prompt_tokens=parts[PROMPT_METRIC],
        output_tokens=parts[OUTPUT_METRIC],
        waiting_requests=parts[WAITING_METRIC],
    ), ""
