"""Which engines the operator asks for their load (observe.observe_engines),
and what one observation holds for sizing to the SLO (observe.observe)."""

from __future__ import annotations

import datetime

import httpx

from spotrag_operator import render
from spotrag_operator.observe import observe, observe_engines

from .operator_fixtures import ragdeployment


def engine_pod(name: str, ip: str, *, serving: bool, deleting: bool = False) -> dict:
    meta = {
        "name": name,
        "labels": {"spotrag.io/serving": "true" if serving else "false", "spotrag.io/capacity": "spot"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": "n"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_only_draining_engines_not_yet_being_deleted_are_asked_for_their_load():
    asked = []

    def engine(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        return httpx.Response(200, text="vllm:num_requests_running 2\nvllm:num_requests_waiting 1\n")

    pods = [
        engine_pod("serving", "10.0.0.1", serving=True),
        engine_pod("draining", "10.0.0.2", serving=False),
        # Deleted already, on a node that may be gone: its address would answer
        # nothing until the timeout, on every reconcile, delaying every drain.
        engine_pod("terminating", "10.0.0.3", serving=False, deleting=True),
    ]
    with httpx.Client(transport=httpx.MockTransport(engine)) as client:
        engines = {e.name: e for e in observe_engines(client, pods)}
    assert asked == ["10.0.0.2"]
    assert engines["draining"].running_requests == 3
    assert engines["serving"].running_requests is None and engines["terminating"].running_requests is None
    assert engines["terminating"].terminating


GATEWAY_METRICS = """\
spotrag_queued_tokens 900
spotrag_queued_prompt_tokens 700
spotrag_queued_output_tokens 200
spotrag_waiting_requests 2
spotrag_time_to_first_token_seconds_bucket{le="0.5"} 3
spotrag_time_to_first_token_seconds_bucket{le="+Inf"} 4
"""
ENGINE_METRICS = """\
vllm:prompt_tokens_total 5000
vllm:generation_tokens_total 300
vllm:num_requests_running 2
vllm:num_requests_waiting 1
"""


class FakeKube:
    """The reads observe() makes: engine and gateway pods by selector; nothing else exists."""

    def __init__(self, engines: list[dict], gateways: list[dict]) -> None:
        self.engines, self.gateways = engines, gateways

    def list(self, api_version: str, kind: str, namespace: str, *, label_selector: str = "") -> list[dict]:
        if kind != "Pod":
            return []
        return self.engines if "component=engine" in label_selector else self.gateways

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        return None


def test_observe_reads_the_gateways_queued_work_and_scrapes_the_serving_ready_engines():
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        return httpx.Response(200, text=GATEWAY_METRICS if request.url.port == render.GATEWAY_PORT else ENGINE_METRICS)

    starting = engine_pod("starting", "10.0.0.4", serving=True)
    starting["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    pods = [
        engine_pod("serving", "10.0.0.1", serving=True),
        engine_pod("draining", "10.0.0.2", serving=False),
        starting,
    ]
    gateway = engine_pod("gateway", "10.0.1.1", serving=True)
    now = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
    body = ragdeployment({"retrieval": {"enabled": False}})
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        seen = observe(FakeKube(pods, [gateway]), client, body, now=now)
    # The draining engine for its load, the serving ready one for calibration, the gateway; not the starting one.
    assert sorted(asked) == ["10.0.0.1", "10.0.0.2", "10.0.1.1"]
    [sample] = seen.samples
    assert (sample.name, sample.time, sample.prompt_tokens, sample.running, sample.waiting) == (
        "serving",
        now.timestamp(),
        5000,
        2,
        1,
    )
    assert seen.queued_tokens == 900 and seen.metric_problem == ""
    assert (seen.work.prompt_tokens, seen.work.output_tokens, seen.work.waiting_requests) == (700, 200, 2)
    assert seen.work.ttft_buckets == {"0.5": 3, "+Inf": 4}


def test_observe_without_a_ready_gateway_has_no_work_and_says_why():
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, text=ENGINE_METRICS))) as client:
        seen = observe(
            FakeKube([], []),
            client,
            ragdeployment({"retrieval": {"enabled": False}}),
            now=datetime.datetime.now(datetime.UTC),
        )
    assert seen.work is None and seen.queued_tokens is None and seen.samples == ()
    assert seen.metric_problem == "no ready gateway to read queued tokens from"
