"""How much work a draining engine still has, read from its vLLM /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import render

BUSY_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def engine_url(pod: dict) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{ip}:{render.ENGINE_PORT}" if ip else None


def parse_busy_requests(text: str) -> int:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in BUSY_METRICS:
                total += sample.value
    return int(total)


def running_requests(client: httpx.Client, pod: dict) -> int | None:
    """Requests the engine is still running or holding: 0 for a pod that never
    got an address (it cannot have served), None when it cannot be asked
    (gone, slow): the drain then waits for its deadline."""
    url = engine_url(pod)
    if url is None:
        return 0
    try:
        response = client.get(f"{url}/metrics", timeout=1.0)
        response.raise_for_status()
        return parse_busy_requests(response.text)
    except (httpx.HTTPError, ValueError):
        return None
