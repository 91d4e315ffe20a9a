"""Queued tokens, the signal the autoscaler scales on, read where it is
defined: the gateways (docs/gateway.md). Either scraped from each ready
gateway pod's /metrics, or from Prometheus when `scaling.prometheus` is set.

Anything short of a complete reading returns None with the reason: the
autoscaler then holds the current size (it must never scale to the minimum
because a scrape failed).
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from spotrag_runtime.kube import Kube, label_selector

from . import render

METRIC = "spotrag_queued_tokens"


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


def from_gateways(kube: Kube, http: httpx.Client, body: dict) -> tuple[float | None, str]:
    namespace = body["metadata"]["namespace"]
    pods = [
        p
        for p in kube.list("v1", "Pod", namespace, label_selector=label_selector(render.gateway_selector(body)))
        if _ready(p)
    ]
    if not pods:
        return None, "no ready gateway to read queued tokens from"
    total = 0.0
    for pod in pods:
        ip = pod["status"].get("podIP")
        name = pod["metadata"]["name"]
        if not ip:
            return None, f"gateway {name} has no address yet"
        try:
            response = http.get(f"http://{ip}:{render.GATEWAY_PORT}/metrics", timeout=2.0)
            response.raise_for_status()
            value = parse_gauge(response.text)
        except (httpx.HTTPError, ValueError) as error:
            return None, f"could not scrape gateway {name}: {error}"
        if value is None:
            return None, f"gateway {name} exports no {METRIC}"
        total += value
    return total, ""


def default_query(body: dict) -> str:
    meta = body["metadata"]
    return f'sum({METRIC}{{namespace="{meta["namespace"]}",pod=~"{meta["name"]}-gateway-.*"}})'


def from_prometheus(http: httpx.Client, body: dict, prometheus: dict) -> tuple[float | None, str]:
    query = prometheus.get("query") or default_query(body)
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
