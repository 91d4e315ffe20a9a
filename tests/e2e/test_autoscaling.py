"""Autoscaling on queued tokens, as a user of a RAGDeployment sees it: load
rises → spot engines are added → spot runs out → the engine asked for on spot
is given up for an on-demand one → load falls → back to the on-demand
baseline. A client streams answers the whole time; none may fail, and every
answer must be the text one engine writes.

The deployment scales fast on purpose: a small target of queued tokens per
engine (300: one 500-token answer in flight wants two engines), no scale-up
window, a 10 s scale-down window, and spot given up after 10 s Pending (the
CRD's minimum). It needs the simulated cluster to run spot out (box_only).
"""

from __future__ import annotations

import pytest

from spotrag_box.testing import scrape

from .test_interruptions import (
    Load,
    engine_selector,
    long_requests,
    ragd_events,
    serving_engines,
    spot_nodes,
    steady,
    wait_cluster_whole,
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
        wait_cluster_whole(e2e, namespace)
        e2e.kubectl("delete", "ragdeployment", DEPLOYMENT, "-n", namespace, "--wait=false", check=False)
        e2e.wait_for(
            lambda: not e2e.pods(namespace, engine_selector(DEPLOYMENT)),
            namespace=namespace,
            timeout=60,
            what="the engines to be deleted",
        )


def _status(e2e, namespace: str) -> dict:
    return (e2e.get_ragdeployment(namespace, DEPLOYMENT) or {}).get("status") or {}
