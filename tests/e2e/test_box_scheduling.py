"""The simulated scheduler's decisions on the pods the operator really renders
and the nodes the box really creates: spot engines on spot nodes of every
label convention, on-demand engines off spot, gateways off GPU nodes, and
the scheduler's own words when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spotrag_box.cluster import ClusterProfile, NodePool
from spotrag_box.cluster.cloud import NTH_SPOT_TAINT, node_manifest
from spotrag_box.cluster.scheduler_plugins import expression_matches, schedule, tolerates
from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic.yaml"
pytestmark = pytest.mark.box_only


def example_body(**spec_overrides: object) -> dict:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(uid="uid-1", namespace="default")
    body["spec"].update(spec_overrides)
    return body


def engine(capacity: str, **spec_overrides: object) -> dict:
    body = example_body(**spec_overrides)
    pod = render.engine_pod(body, defaulted_spec(body), capacity)
    pod["metadata"]["name"] = f"engine-{capacity}"
    return pod


def gateway() -> dict:
    body = example_body()
    template = render.gateway_deployment(body, defaulted_spec(body))["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gateway", "namespace": "default", **template["metadata"]},
        "spec": template["spec"],
    }


def cluster_nodes(profile: ClusterProfile) -> list[dict]:
    nodes = []
    for pool in profile.pools:
        for index in range(pool.size):
            nodes.append(node_manifest(pool, f"{pool.name}-{index + 1}"))
    return nodes


def pools_of(nodes: list[dict]) -> dict[str, str]:
    return {n["metadata"]["name"]: n["metadata"]["labels"]["box.spotrag.io/pool"] for n in nodes}


def feasible(pod: dict, nodes: list[dict]) -> set[str]:
    """Every node the pod could go on, alone on an empty cluster."""
    return {n["metadata"]["name"] for n in nodes if schedule(pod, [n], {}).node}


def test_spot_engines_land_on_spot_nodes_of_each_label_convention():
    nodes = cluster_nodes(ClusterProfile.default())
    pools = pools_of(nodes)
    # Zone a's spot pool is labelled as Karpenter does, zone b's by hand.
    assert {pools[n] for n in feasible(engine("spot"), nodes)} == {"gpu-spot-a", "gpu-spot-b"}


def test_on_demand_engines_avoid_spot_and_cpu_nodes():
    nodes = cluster_nodes(ClusterProfile.default())
    pools = pools_of(nodes)
    # Karpenter's on-demand label in zone a, an EKS managed node group's in zone b.
    assert {pools[n] for n in feasible(engine("on-demand"), nodes)} == {"gpu-od-a", "gpu-od-b"}


def test_gateways_stay_off_gpu_nodes():
    nodes = cluster_nodes(ClusterProfile.default())
    pools = pools_of(nodes)
    assert {pools[n] for n in feasible(gateway(), nodes)} == {"system-a", "system-b"}


def test_instance_type_narrowing_is_honoured():
    nodes = cluster_nodes(ClusterProfile.default())
    pools = pools_of(nodes)
    pod = engine("spot", gpu={"instanceTypes": ["g5.2xlarge"]})
    assert {pools[n] for n in feasible(pod, nodes)} == {"gpu-spot-b"}


def test_spot_engines_spread_over_zones():
    nodes = cluster_nodes(ClusterProfile.default())
    zone = {n["metadata"]["name"]: n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes}
    placed: dict[str, list[dict]] = {}
    zones = []
    for index in range(2):
        pod = engine("spot")
        pod["metadata"]["name"] = f"engine-{index}"
        decision = schedule(pod, nodes, placed)
        assert decision.node is not None, decision.message
        placed.setdefault(decision.node, []).append(pod)
        zones.append(zone[decision.node])
    assert sorted(zones) == ["us-east-1a", "us-east-1b"]


def test_a_full_node_takes_no_second_gpu_engine():
    pool = NodePool(name="gpu", instance_type="g6.2xlarge", zone="us-east-1a", capacity_type="spot")
    nodes = [node_manifest(pool, "gpu-1")]
    first = engine("spot")
    assert schedule(first, nodes, {}).node == "gpu-1"
    decision = schedule(engine("spot"), nodes, {"gpu-1": [first]})
    assert decision.node is None
    assert decision.message == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."


def test_engine_default_requests_fit_the_smallest_l4_instance():
    # g6.xlarge allocates 3920m / 14.5Gi; the engine asks 2 CPU / 8Gi by default.
    pool = NodePool(name="small", instance_type="g6.xlarge", zone="us-east-1a", capacity_type="spot")
    decision = schedule(engine("spot"), [node_manifest(pool, "small-1")], {})
    assert decision.node == "small-1", decision.message


def test_unschedulable_message_counts_each_reason():
    nodes = cluster_nodes(ClusterProfile.default())
    decision = schedule(engine("spot", model={"name": "Qwen/Qwen2.5-72B-Instruct", "tensorParallelSize": 2}), nodes, {})
    assert decision.node is None
    assert decision.message == (
        "0/8 nodes are available: 4 Insufficient nvidia.com/gpu, 4 node(s) didn't match Pod's node affinity/selector."
    )


def test_interrupted_and_cordoned_nodes_take_nothing_new():
    pool = NodePool(name="gpu", instance_type="g6.2xlarge", zone="us-east-1a", capacity_type="spot")
    noticed = node_manifest(pool, "noticed")
    noticed["spec"]["taints"].append({"key": NTH_SPOT_TAINT, "value": "spot-itn-1", "effect": "NoSchedule"})
    cordoned = node_manifest(pool, "cordoned")
    cordoned["spec"]["unschedulable"] = True
    decision = schedule(engine("spot"), [noticed, cordoned], {})
    assert decision.node is None
    assert decision.message == (
        "0/2 nodes are available: 1 node(s) had untolerated taint {aws-node-termination-handler/spot-itn: spot-itn-1}, "
        "1 node(s) were unschedulable."
    )


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        (
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
            True,
        ),
        (
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"},
            {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
            False,
        ),
        ({"key": "k", "operator": "Equal", "value": "a"}, {"key": "k", "value": "b", "effect": "NoSchedule"}, False),
        (
            {"key": "k", "value": "a"},
            {"key": "k", "value": "a", "effect": "NoExecute"},
            True,
        ),  # Equal is the default operator
        ({"operator": "Exists"}, {"key": "anything", "effect": "NoSchedule"}, True),  # empty key + Exists: all taints
        ({"key": "", "operator": "Equal", "value": ""}, {"key": "k", "effect": "NoSchedule"}, False),
    ],
)
def test_tolerations(toleration, taint, expected):
    assert tolerates([toleration], taint) is expected


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        ({"key": "a", "operator": "In", "values": ["x", "y"]}, {"a": "y"}, True),
        ({"key": "a", "operator": "In", "values": ["x"]}, {}, False),
        ({"key": "a", "operator": "NotIn", "values": ["x"]}, {}, True),
        ({"key": "a", "operator": "NotIn", "values": ["x"]}, {"a": "x"}, False),
        ({"key": "a", "operator": "Exists"}, {"a": ""}, True),
        ({"key": "a", "operator": "DoesNotExist"}, {"a": ""}, False),
        ({"key": "gpus", "operator": "Gt", "values": ["1"]}, {"gpus": "4"}, True),
        ({"key": "gpus", "operator": "Lt", "values": ["1"]}, {"gpus": "4"}, False),
        ({"key": "gpus", "operator": "Gt", "values": ["1"]}, {"gpus": "many"}, False),
    ],
)
def test_node_selector_expressions(expression, labels, expected):
    assert expression_matches(expression, labels) is expected
