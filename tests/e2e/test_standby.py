"""A warm standby replaces an interrupted engine in about a second: with
`spec.model.standby.replicas: 1` the operator keeps one engine loaded and
asleep (vLLM's sleep mode; the box's emulator wakes in the measured 0.80 s)
outside the serving set; on a spot notice it wakes that engine into the
serving set instead of starting one cold, and starts a new standby behind
it. A client streams answers the whole time; none may fail.
"""

from __future__ import annotations

import httpx
import pytest

from .test_interruptions import (
    Load,
    engine_selector,
    plain_requests,
    remove_deployment,
    wait_event,
    wait_out_of_serving,
    wait_served,
)

pytestmark = pytest.mark.box_only

DEPLOYMENT = "warm"
TIMEOUT = 120.0
STANDBY = "spotrag.io/standby"


def standbys(e2e, namespace: str) -> list:
    return [
        p
        for p in e2e.pods(namespace, engine_selector(DEPLOYMENT))
        if p.metadata.labels.get(STANDBY) == "true" and not p.metadata.deletion_timestamp
    ]


def serving(e2e, namespace: str, capacity: str | None = None) -> list:
    return [
        p
        for p in e2e.pods(namespace, engine_selector(DEPLOYMENT))
        if p.metadata.labels.get("spotrag.io/serving") == "true"
        and not p.metadata.deletion_timestamp
        and (capacity is None or p.metadata.labels.get("spotrag.io/capacity") == capacity)
    ]


def asleep(pod) -> bool:
    if not pod.status.pod_ip:
        return False
    try:
        answer = httpx.get(f"http://{pod.status.pod_ip}:8000/is_sleeping", timeout=2)
        return answer.status_code == 200 and answer.json()["is_sleeping"] is True
    except httpx.HTTPError:
        return False


def test_a_spot_notice_wakes_the_standby_instead_of_starting_cold(e2e, namespace):
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        retrieval={"enabled": False},
        model={"standby": {"replicas": 1, "wakeTimeoutSeconds": 10}},
        scaling={"minReplicas": 2, "maxReplicas": 2, "onDemandBaseline": 1},
        interruption={"drainTimeoutSeconds": 30},
    )
    e2e.apply(manifest)
    try:
        e2e.wait_ready(namespace, DEPLOYMENT)
        [standby] = e2e.wait_for(
            lambda: [p for p in standbys(e2e, namespace) if asleep(p)] or None,
            namespace=namespace,
            timeout=TIMEOUT,
            what="a standby engine, loaded and asleep",
        )
        assert "--enable-sleep-mode" in standby.spec.containers[0].args
        [victim] = e2e.wait_for(
            lambda: serving(e2e, namespace, "spot") or None,
            namespace=namespace,
            timeout=TIMEOUT,
            what="a serving spot engine",
        )
        assert victim.spec.node_name != standby.spec.node_name
        with e2e.service_url(namespace, DEPLOYMENT) as url, Load(url, plain_requests(e2e)) as load:
            wait_served(e2e, load, namespace, 3, "before the notice")
            e2e.cluster.interrupt_node(victim.spec.node_name, style="aws", notice_seconds=20)
            wait_out_of_serving(e2e, namespace, {victim.metadata.name})
            # The standby, not a cold engine, takes the interrupted one's place.
            e2e.wait_for(
                lambda: standby.metadata.name in {p.metadata.name for p in serving(e2e, namespace)},
                namespace=namespace,
                timeout=30,
                what=f"standby {standby.metadata.name} woken into the serving set",
            )
            wait_event(e2e, namespace, "StandbyWoken", standby.metadata.name, deployment=DEPLOYMENT)
            woken = next(p for p in serving(e2e, namespace) if p.metadata.name == standby.metadata.name)
            assert STANDBY not in (woken.metadata.labels or {})
            wait_served(e2e, load, namespace, 3, "after the standby took over")
            # A new standby starts behind it and goes to sleep in turn.
            e2e.wait_for(
                lambda: (
                    [p for p in standbys(e2e, namespace) if p.metadata.name != standby.metadata.name and asleep(p)]
                    or None
                ),
                namespace=namespace,
                timeout=TIMEOUT,
                what="a new standby, asleep",
            )
            load.stop()
            assert load.failures == []
        # Nothing started cold since: the spot engine serving now is the woken standby.
        assert [p.metadata.name for p in serving(e2e, namespace, "spot")] == [standby.metadata.name]
    finally:
        remove_deployment(e2e, namespace, DEPLOYMENT)
