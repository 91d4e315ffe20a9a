"""What an engine reports on its vLLM /metrics: how much work a draining engine
still has, and the counters calibration fits engine rates to."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import render
from .calibration import DRAINING, ERRORING, SERVING, STARTING, EngineSample, parse_engine_metrics

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


def calibration_state(engine) -> str:
    """An engine (plan.Engine) as calibration sees it: only SERVING ones are fitted."""
    if engine.failed:
        return ERRORING
    if engine.terminating or not engine.serving:
        return DRAINING
    return SERVING if engine.ready else STARTING


def engine_samples(client: httpx.Client, pods: list[dict], engines: list, *, now: float) -> list[EngineSample]:
    """Scrape every serving, ready engine for calibration (pods and plan.Engines in
    the same order, as observe_engines returns them). The others are not
    asked: calibration would not use them, and an engine left out is
    forgotten, so it starts afresh when it serves again."""
    samples = []
    for pod, engine in zip(pods, engines, strict=True):
        if calibration_state(engine) == SERVING:
            sample = engine_sample(client, pod, state=SERVING, now=now)
            if sample is not None:
                samples.append(sample)
    return samples
