"""What an engine reports on its vLLM /metrics: how much work a draining engine
still has, and the counters calibration fits engine rates to."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import render
from .calibration import EngineSample, parse_engine_metrics

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


def engine_sample(client: httpx.Client, pod: dict, *, state: str, now: float) -> EngineSample | None:
    """One scrape for calibration (calibration.calibrate); None when the engine
    cannot be asked. `state` is calibration.SERVING / STARTING / DRAINING /
    ERRORING, from what the operator knows of the pod."""
    url = engine_url(pod)
    if url is None:
        return None
    try:
        response = client.get(f"{url}/metrics", timeout=1.0)
        response.raise_for_status()
        return parse_engine_metrics(response.text, name=pod["metadata"]["name"], time=now, state=state)
    except (httpx.HTTPError, ValueError):
        return None
