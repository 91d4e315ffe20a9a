"""One engine across two nodes (gpu.nodesPerEngine: 2), as a user sees it: each
engine is a LeaderWorkerSet group of a leader and a worker on two nodes of
one capacity type; the gateway sees the leaders only. A spot notice for the
node of a group's *worker* drains the whole group (its leader leaves
serving), running answers finish, the group is deleted as a unit and a new
spot group replaces it, while a client streams without pause and not one
request fails.

The box runs a small LeaderWorkerSet controller (box/spotrag_box/cluster/
leaderworkersets.py); on a real cluster the upstream one must be installed.
The notice is shortened as in test_interruptions.py (AWS: 20 s for 2 min).
"""

from __future__ import annotations

from typing import Any

import pytest

from .test_interruptions import (
    SCENARIO_TIMEOUT,
    Load,
    _gateway_ready,
    plain_requests,
    ready,
    wait_cluster_whole,
    wait_event,
    wait_served,
)

pytestmark = pytest.mark.box_only

DEPLOYMENT = "grouped"
LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def groups(e2e: Any, namespace: str) -> dict[str, dict]:
    """The deployment's live engine groups (LeaderWorkerSets) by name."""
    listing = e2e.custom.list_namespaced_custom_object(
        *LWS[:2], namespace, LWS[2], label_selector=f"spotrag.io/deployment={DEPLOYMENT}"
    )
    return {g["metadata"]["name"]: g for g in listing["items"] if not g["metadata"].get("deletionTimestamp")}


def members(e2e: Any, namespace: str, group: str) -> list[Any]:
    return [p for p in e2e.pods(namespace, f"{NAME_LABEL}={group}") if not p.metadata.deletion_timestamp]


def leader(e2e: Any, namespace: str, group: str) -> Any | None:
    return next((p for p in members(e2e, namespace, group) if p.metadata.labels[WORKER_INDEX_LABEL] == "0"), None)


def group_nodes(e2e: Any, namespace: str, group: str) -> dict[str, str]:
    """worker index → node."""
    return {p.metadata.labels[WORKER_INDEX_LABEL]: p.spec.node_name for p in members(e2e, namespace, group)}


def steady_groups(e2e: Any, namespace: str, *, spot: int, on_demand: int) -> bool:
    """Exactly the groups wanted, each a Ready leader (serving) and worker on
    two nodes, none draining; the status counts groups."""
    found = groups(e2e, namespace)
    by_capacity = {"spot": 0, "on-demand": 0}
    for name, lws in found.items():
        labels = lws["metadata"].get("labels") or {}
        pods = members(e2e, namespace, name)
        head = leader(e2e, namespace, name)
        if labels.get("spotrag.io/serving") != "true" or head is None:
            return False
        if head.metadata.labels.get("spotrag.io/serving") != "true":
            return False
        if len(pods) != 2 or not all(ready(p) for p in pods) or len({p.spec.node_name for p in pods}) != 2:
            return False
        by_capacity[labels.get("spotrag.io/capacity", "")] = (
            by_capacity.get(labels.get("spotrag.io/capacity", ""), 0) + 1
        )
    status = (e2e.get_ragdeployment(namespace, DEPLOYMENT) or {}).get("status") or {}
    return (
        by_capacity == {"spot": spot, "on-demand": on_demand}
        and status.get("readyReplicas") == status.get("desiredReplicas") == spot + on_demand
    )


def wait_steady_groups(e2e: Any, namespace: str, *, spot: int = 1, on_demand: int = 1, timeout: float = 120) -> None:
    e2e.wait_for(
        lambda: steady_groups(e2e, namespace, spot=spot, on_demand=on_demand),
        namespace=namespace,
        timeout=timeout,
        what=f"{on_demand} on-demand and {spot} spot engine groups of two Ready pods each, leaders serving",
    )


def served_addresses(e2e: Any, namespace: str) -> set[str]:
    """Pod IPs in the engines Service's EndpointSlices: what every gateway routes to."""
    slices = e2e.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={DEPLOYMENT}-engines"
    ).items
    return {a for s in slices for e in s.endpoints or [] for a in e.addresses or []}


def test_a_two_node_engine_group_loses_a_spot_node_drains_as_a_unit_and_is_replaced(e2e, namespace):
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        gpu={"nodesPerEngine": 2},
        scaling={"minReplicas": 2, "maxReplicas": 2, "onDemandBaseline": 1},
        # A group needs two spot nodes at once; the box has four, two per zone.
        spot={"fallbackAfterSeconds": 30, "retryAfterSeconds": 30},
        interruption={"drainTimeoutSeconds": 30},
    )
    e2e.apply([e2e.corpus_configmap(namespace), manifest])
    try:
        e2e.wait_ready(namespace, DEPLOYMENT)
        wait_steady_groups(e2e, namespace)

        # Each group is one engine to the gateways: its leader, never its worker.
        leaders = {name: leader(e2e, namespace, name) for name in groups(e2e, namespace)}
        e2e.wait_for(
            lambda: served_addresses(e2e, namespace) == {p.status.pod_ip for p in leaders.values()},
            namespace=namespace,
            timeout=30,
            what="the engines Service to list exactly the two leaders",
        )
        for name, lws in groups(e2e, namespace).items():
            capacity = lws["metadata"]["labels"]["spotrag.io/capacity"]
            pods = members(e2e, namespace, name)
            assert {p.metadata.labels["spotrag.io/capacity"] for p in pods} == {capacity}, (
                f"group {name} mixes capacity types: {[(p.metadata.name, p.metadata.labels) for p in pods]}"
            )

        (victim,) = [
            n for n, g in groups(e2e, namespace).items() if g["metadata"]["labels"]["spotrag.io/capacity"] == "spot"
        ]
        nodes = group_nodes(e2e, namespace, victim)
        worker_node = nodes["1"]
        victim_leader = leader(e2e, namespace, victim).metadata.name

        with e2e.service_url(namespace, DEPLOYMENT) as url:
            e2e.wait_for(lambda: _gateway_ready(url), what="the gateway's /readyz", namespace=namespace)
            with Load(url, plain_requests(e2e), threads=3) as load:
                wait_served(e2e, load, namespace, 3, "before the notice")
                # The notice is for the worker's node: the leader's node is healthy.
                e2e.cluster.interrupt_node(worker_node, style="aws", notice_seconds=20)

                def leader_out() -> bool:
                    pod = next(
                        (p for p in e2e.pods(namespace, f"{NAME_LABEL}={victim}") if p.metadata.name == victim_leader),
                        None,
                    )
                    return pod is None or pod.metadata.labels.get("spotrag.io/serving") == "false"

                e2e.wait_for(
                    leader_out,
                    namespace=namespace,
                    timeout=30,
                    what=f"the leader {victim_leader} of group {victim} out of serving for a notice on its worker's node {worker_node}",
                )
                e2e.wait_for(
                    lambda: victim not in groups(e2e, namespace) and not members(e2e, namespace, victim),
                    namespace=namespace,
                    timeout=SCENARIO_TIMEOUT,
                    what=f"group {victim} deleted as a unit, leader and worker",
                )
                wait_steady_groups(e2e, namespace, timeout=SCENARIO_TIMEOUT)
                assert worker_node in e2e.cluster.interruptions(), (
                    f"node {worker_node} went before the group drained: the scenario cannot tell a drain from a loss"
                )
                replacement = [
                    n
                    for n, g in groups(e2e, namespace).items()
                    if g["metadata"]["labels"]["spotrag.io/capacity"] == "spot"
                ]
                assert replacement and replacement != [victim]
                assert worker_node not in group_nodes(e2e, namespace, replacement[0]).values()
                wait_served(e2e, load, namespace, 3, "after the replacement group is serving")
            assert load.failures == []

        wait_event(e2e, namespace, "EngineInterrupted", victim, worker_node, deployment=DEPLOYMENT)
        deleted = wait_event(e2e, namespace, "EngineDeleted", victim, deployment=DEPLOYMENT)
        assert "engine group" in deleted.message
    finally:
        e2e.kubectl("delete", "ragdeployment", DEPLOYMENT, "-n", namespace, "--wait=false", check=False)
        wait_cluster_whole(e2e, namespace)
        e2e.wait_for(
            lambda: not e2e.pods(namespace, f"spotrag.io/deployment={DEPLOYMENT}"),
            namespace=namespace,
            timeout=60,
            what="the engine groups' pods to be deleted",
        )


def test_a_group_size_no_nodes_can_hold_stays_pending_and_says_which_nodes_would_fit(e2e, namespace):
    """Four nodes per engine on spot g6.12xlarge, an instance type the box's
    pools do not have: the group stays Pending and the RAGDeployment's
    GroupsSchedulable condition says what nodes it needs and what the
    scheduler answered."""
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        gpu={"nodesPerEngine": 4, "instanceTypes": ["g6.12xlarge"]},
        scaling={"minReplicas": 1, "maxReplicas": 1, "onDemandBaseline": 1},
    )
    e2e.apply([e2e.corpus_configmap(namespace), manifest])
    try:

        def condition() -> dict | None:
            status = (e2e.get_ragdeployment(namespace, DEPLOYMENT) or {}).get("status") or {}
            found = next((c for c in status.get("conditions") or [] if c["type"] == "GroupsSchedulable"), None)
            return found if found and found["status"] == "False" else None

        found = e2e.wait_for(condition, namespace=namespace, timeout=60, what="GroupsSchedulable=False")
        assert found["reason"] == "NoNodesForGroup"
        assert "needs 4 nodes at once" in found["message"] and "g6.12xlarge" in found["message"]
        assert "nodes are available" in found["message"]  # the scheduler's own words
        assert "on-demand nodes that would fit: none (0 of the 4 a group needs)" in found["message"]
    finally:
        e2e.kubectl("delete", "ragdeployment", DEPLOYMENT, "-n", namespace, "--wait=false", check=False)
