"""Autoscaling, as a user of a RAGDeployment sees it.

On queued tokens: load rises → spot engines are added → spot runs out → the
engine asked for on spot is given up for an on-demand one → load falls → back
to the on-demand baseline. A client streams answers the whole time; none may
fail, and every answer must be the text one engine writes. The deployment
scales fast on purpose: a small target of queued tokens per engine (300: one
500-token answer in flight wants two engines), no scale-up window, a 10 s
scale-down window, and spot given up after 10 s Pending (the CRD's minimum).

On a latency SLO alone (no target): a burst of long prompts at the floor
scales up in one go, the gateway's TTFT p95 meets the SLO once the engines
serve, and the fleet goes back to its floor without going up again.

Both need the simulated cluster (box_only).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import kubernetes
import pytest

from spotrag_box.testing import scrape
from spotrag_operator.calibration import histogram_quantile

from .test_interruptions import (
    Load,
    Request,
    answer_words,
    engine_selector,
    expected_answer,
    long_requests,
    ragd_events,
    remove_deployment,
    serving_engines,
    spot_nodes,
    steady,
    wait_event,
    wait_served,
    wait_steady,
)

pytestmark = pytest.mark.box_only

DEPLOYMENT = "scaler"
TARGET_PER_ENGINE = 300
ANSWER_TOKENS = 500  # one answer in flight: ~515 queued tokens → 2 engines; four → the maximum, 3
TIMEOUT = 90.0


def test_load_rises_spot_runs_out_load_falls(e2e, namespace):
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        retrieval={"enabled": False},  # scaling is about generation; no index needed
        scaling={
            "minReplicas": 1,
            "maxReplicas": 3,
            "onDemandBaseline": 1,
            "targetQueuedTokensPerReplica": TARGET_PER_ENGINE,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 10,
        },
        spot={"fallbackAfterSeconds": 10, "retryAfterSeconds": 30},
    )
    e2e.apply(manifest)
    try:
        e2e.wait_ready(namespace, DEPLOYMENT)
        wait_steady(e2e, namespace, spot=0, on_demand=1, deployment=DEPLOYMENT, timeout=120)
        with e2e.service_url(namespace, DEPLOYMENT) as url:
            requests = long_requests(e2e, max_tokens=ANSWER_TOKENS)
            with Load(url, requests, threads=1, timeout=120) as load:
                # Load rises: one long answer at a time needs a second engine, on spot.
                wait_served(e2e, load, namespace, 1, "before scaling")
                wait_steady(e2e, namespace, spot=1, on_demand=1, deployment=DEPLOYMENT)
                wait_event(e2e, namespace, "Scaled", "1 → 2", deployment=DEPLOYMENT)
                queued = (e2e.get_ragdeployment(namespace, DEPLOYMENT)["status"]).get("queuedTokens")
                assert queued is not None, "status.queuedTokens is not reported under load"

                # Spot runs out: no spot launch succeeds, and the spare spot nodes are gone.
                [spot_engine] = serving_engines(e2e, namespace, "spot", DEPLOYMENT)
                e2e.cluster.set_spot_capacity(False)
                for spare in set(spot_nodes(e2e)) - {spot_engine.spec.node_name}:
                    e2e.cluster.terminate_node(spare)

                # Load rises again: the third engine asked for on spot cannot be
                # placed; after fallbackAfterSeconds an on-demand engine replaces it.
                load.add(3)
                e2e.wait_for(
                    lambda: (_status(e2e, namespace).get("desiredReplicas") or 0) >= 3,
                    namespace=namespace,
                    timeout=TIMEOUT,
                    what=f"the autoscaler to want 3 engines (status: {_status(e2e, namespace).get('engines')}, queued {_status(e2e, namespace).get('queuedTokens')})",
                )
                wait_event(e2e, namespace, "SpotShort", deployment=DEPLOYMENT)
                wait_steady(e2e, namespace, spot=1, on_demand=2, deployment=DEPLOYMENT)
                assert spot_engine.metadata.name in {
                    p.metadata.name for p in serving_engines(e2e, namespace, "spot", DEPLOYMENT)
                }, "the placed spot engine was moved"
                wait_served(e2e, load, namespace, 4, "with the on-demand fallback serving")
                load.stop()
                assert load.failures == []

            # Load falls: after the scale-down window, back to the baseline alone.
            e2e.wait_for(
                steady(e2e, namespace, spot=0, on_demand=1, deployment=DEPLOYMENT),
                namespace=namespace,
                timeout=TIMEOUT,
                what="the engines above the on-demand baseline to be drained and deleted once the load is gone",
            )
            wait_event(e2e, namespace, "Scaled", "→ 1", deployment=DEPLOYMENT)
            assert scrape(f"{url}/metrics").value("spotrag_requests_total", outcome="engine_failed") == 0
        status = _status(e2e, namespace)
        assert (status["desiredReplicas"], status["onDemandReplicas"], status["spotReplicas"]) == (1, 1, 0), status
        [baseline] = e2e.pods(namespace, engine_selector(DEPLOYMENT))
        assert baseline.metadata.labels["spotrag.io/capacity"] == "on-demand"
        print(
            "\n".join(
                f"{e.reason}: {e.message}"
                for e in sorted(ragd_events(e2e, namespace, DEPLOYMENT), key=lambda e: e.metadata.creation_timestamp)
            )
        )
    finally:
        remove_deployment(e2e, namespace, DEPLOYMENT)


def _status(e2e, namespace: str) -> dict:
    return (e2e.get_ragdeployment(namespace, DEPLOYMENT) or {}).get("status") or {}


# Sized on the SLO ---------------------------------------------------------------------

SLO_DEPLOYMENT = "slo-sized"
SLO_TTFT = 1.0
PROMPT_WORDS = 2000  # a long prompt: the box's engines count a word as a token
SLO_ANSWER_TOKENS = 120  # ~1 s of decode at the box's 8 ms per token
CLIENTS = 3  # one long request per engine (the gateway's token cap): the floor's one engine makes two wait
# The box's emulated engine, as a user would have measured it (engine emulator defaults, BOX_TIMING).
BOX_ENGINE = {
    "prefillTokensPerSecond": 50_000,
    "decodeTokensPerSecond": 125,  # an 8 ms step
    "batchDecodeTokensPerSecond": 4_900,  # 64 streams: 8 ms x 1.63
    "kvCacheTokens": 131_072,
}


def long_prompt_requests(e2e: Any) -> list[Request]:
    """Prompts of PROMPT_WORDS words, answers of SLO_ANSWER_TOKENS tokens, checkable word for word."""
    words = answer_words(e2e)
    requests = []
    for i in range(CLIENTS):
        question = " ".join(f"passage{i}-{n % 97}" for n in range(PROMPT_WORDS)) + " What does it say?"
        expected = (
            expected_answer(question, max_tokens=SLO_ANSWER_TOKENS, ignore_eos=True, answer_words=words)
            if words
            else None
        )
        requests.append(Request(f"long-prompt-{i}", question, SLO_ANSWER_TOKENS, ignore_eos=True, expected=expected))
    return requests


class DesiredRecorder:
    """Every value of status.desiredReplicas, in order, polled on a client of its own."""

    def __init__(self, e2e: Any, namespace: str, name: str) -> None:
        self.values: list[int] = []
        self._custom = kubernetes.client.CustomObjectsApi(
            kubernetes.config.new_client_from_config(config_file=str(e2e.kubeconfig))
        )
        self._namespace, self._name = namespace, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DesiredRecorder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                ragd = self._custom.get_namespaced_custom_object(
                    "spotrag.io", "v1alpha1", self._namespace, "ragdeployments", self._name
                )
            except kubernetes.client.ApiException:
                continue
            desired = (ragd.get("status") or {}).get("desiredReplicas")
            if desired is not None and (not self.values or self.values[-1] != desired):
                self.values.append(desired)


def ttft_buckets(url: str) -> dict[str, float]:
    return {
        s.labels["le"]: s.value for s in scrape(f"{url}/metrics").find("spotrag_time_to_first_token_seconds_bucket")
    }


def test_sized_on_the_slo_alone_a_burst_of_long_prompts_scales_up_meets_it_and_scales_back(e2e, namespace):
    manifest = e2e.ragdeployment_manifest(
        namespace,
        SLO_DEPLOYMENT,
        retrieval={"enabled": False},
        scaling={
            "minReplicas": 1,
            "maxReplicas": 3,
            "onDemandBaseline": 1,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 10,
            "slo": {"ttftSeconds": SLO_TTFT, "percentile": 95},
            "calibration": BOX_ENGINE,
        },
        # One long request per engine: a second one waits in the gateway's queue.
        gateway={"maxInflightTokensPerEngine": 256},
    )
    assert "targetQueuedTokensPerReplica" not in manifest["spec"]["scaling"]
    e2e.apply(manifest)
    try:
        e2e.wait_ready(namespace, SLO_DEPLOYMENT)
        wait_steady(e2e, namespace, spot=0, on_demand=1, deployment=SLO_DEPLOYMENT, timeout=120)
        with e2e.service_url(namespace, SLO_DEPLOYMENT) as url, DesiredRecorder(e2e, namespace, SLO_DEPLOYMENT) as seen:
            with Load(url, long_prompt_requests(e2e), threads=CLIENTS, timeout=60) as load:
                # The burst finds one engine: the SLO sizing asks for the rest in one step.
                wait_steady(e2e, namespace, spot=2, on_demand=1, deployment=SLO_DEPLOYMENT)
                status = _slo_status(e2e, namespace)
                assert status["sizing"]["basis"] == "slo", status["sizing"]
                assert status["sizing"]["rates"]["prefillTokensPerSecond"] > 0, status["sizing"]
                reach = _conditions(status)["SLOReachable"]
                assert reach["status"] == "True", reach

                # Warmed up: once what waited at the floor has its answer and nothing waits
                # in the gateway, every client has an engine, and the TTFT p95 meets the SLO.
                wait_served(e2e, load, namespace, CLIENTS, "once three engines serve")
                assert load.failures == [], load.failures[:3]  # wait_served stops at the first failure
                e2e.wait_for(
                    lambda: scrape(f"{url}/metrics").value("spotrag_waiting_requests") == 0,
                    namespace=namespace,
                    timeout=TIMEOUT,
                    what="no request waiting in the gateway at three engines",
                )
                before = ttft_buckets(url)
                wait_served(e2e, load, namespace, 12, "at three engines")
                assert load.failures == [], load.failures[:3]
                p95, answered = histogram_quantile(before, ttft_buckets(url), 0.95)
                assert answered >= 12 and p95 is not None
                assert p95 <= SLO_TTFT, f"TTFT p95 {p95:.2f}s over {answered:.0f} answers at three engines"
                load.stop()
                assert load.failures == []

            # Quiet: back to the floor.
            e2e.wait_for(
                steady(e2e, namespace, spot=0, on_demand=1, deployment=SLO_DEPLOYMENT),
                namespace=namespace,
                timeout=TIMEOUT,
                what="the engines above the floor to be drained and deleted once the burst is over",
            )
        status = _slo_status(e2e, namespace)
        assert status["desiredReplicas"] == 1, status
        # The rates were fitted online from the engines' counters, and status.scaling keeps
        # the fit for a restarted operator.
        assert status["sizing"]["intervals"] > 0, status["sizing"]
        assert status["scaling"]["calibration"]["intervals"] > 0, status["scaling"]["calibration"]

        # No flapping: up to 3, then only down, as status showed it and as the Events tell it.
        peak = seen.values.index(max(seen.values))
        assert max(seen.values) == 3, seen.values
        assert seen.values[: peak + 1] == sorted(seen.values[: peak + 1]), f"desired replicas went {seen.values}"
        assert seen.values[peak:] == sorted(seen.values[peak:], reverse=True), f"desired replicas went {seen.values}"
        moves = [
            (int(m.group(1)), int(m.group(2)))
            for e in ragd_events(e2e, namespace, SLO_DEPLOYMENT)
            if e.reason == "Scaled" and (m := re.search(r"(\d+) → (\d+)$", e.message or ""))
        ]
        ups = sum(after - before for before, after in moves if after > before)
        downs = sum(before - after for before, after in moves if after < before)
        assert (ups, downs) == (2, 2), f"scaled {moves}: more than one climb and one descent"
        print(f"desired replicas: {seen.values}; TTFT p95 at three engines {p95:.2f}s; sizing {status['sizing']}")
        print("\n".join(f"{e.reason}: {e.message}" for e in ragd_events(e2e, namespace, SLO_DEPLOYMENT)))
    finally:
        remove_deployment(e2e, namespace, SLO_DEPLOYMENT)


def _slo_status(e2e: Any, namespace: str) -> dict:
    return (e2e.get_ragdeployment(namespace, SLO_DEPLOYMENT) or {}).get("status") or {}


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}
