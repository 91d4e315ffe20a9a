"""One engine over several nodes: the LeaderWorkerSet the operator renders,
a group planned as one unit (a notice for any of its nodes drains it, it is
drained and deleted whole, scaling counts groups, a group without nodes says
which would fit), and the box's LeaderWorkerSet controller over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.cluster import leaderworkersets
from spotrag_box.testing import eventually_async
from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec
from spotrag_operator.observe import Observed
from spotrag_operator.plan import DrainTiming, Engine, plan_engines
from spotrag_operator.reconcile import plan_reconcile
from spotrag_operator.signals import node_signal
from spotrag_runtime.kube import AsyncKube, Informer, collection_path, object_path

from .operator_fixtures import ragdeployment

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
GROUPS = {"gpu": {"nodesPerEngine": 2}, "model": {"tensorParallelSize": 1}}


def rendered(overrides: dict | None = None) -> tuple[dict, dict]:
    body = ragdeployment(GROUPS | (overrides or {}))
    return body, defaulted_spec(body)


def args_of(template: dict) -> list[str]:
    return template["spec"]["containers"][0]["args"]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- what is rendered ---------------------------------------------------------


def test_an_engine_group_is_a_leaderworkerset_of_one_group_with_vllms_multi_node_flags():
    body, spec = rendered()
    lws = render.engine_unit(body, spec, render.SPOT)
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert lws["spec"]["replicas"] == 1
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = template["leaderTemplate"], template["workerTemplate"]
    for args, rank in ((args_of(leader), "0"), (args_of(worker), "$(LWS_WORKER_INDEX)")):
        assert flag(args, "--pipeline-parallel-size") == "2" and flag(args, "--tensor-parallel-size") == "1"
        assert flag(args, "--nnodes") == "2" and flag(args, "--node-rank") == rank
        assert flag(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
    assert "--headless" in args_of(worker) and "--headless" not in args_of(leader)
    # The gateways see the leader only: it alone is an "engine" with the serving label.
    assert leader["metadata"]["labels"][render.LABEL_COMPONENT] == "engine"
    assert leader["metadata"]["labels"][render.LABEL_SERVING] == "true"
    assert worker["metadata"]["labels"][render.LABEL_COMPONENT] == render.COMPONENT_WORKER
    assert render.LABEL_SERVING not in worker["metadata"]["labels"]
    assert "readinessProbe" in leader["spec"]["containers"][0]
    assert "readinessProbe" not in worker["spec"]["containers"][0]
    for pod_template in (leader, worker):
        (apart,) = pod_template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert apart["topologyKey"] == "kubernetes.io/hostname"
        assert apart["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
    # The group's record: the operator keeps capacity, serving and drains on the set.
    assert lws["metadata"]["labels"][render.LABEL_CAPACITY] == render.SPOT
    assert lws["metadata"]["ownerReferences"][0]["kind"] == "RAGDeployment"


def terms(pod_template: dict) -> list[list[dict]]:
    required = pod_template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [t["matchExpressions"] for t in required["nodeSelectorTerms"]]


@pytest.mark.parametrize(
    "capacity, mixed, worker_capacities",
    [
        (render.SPOT, False, {"spot"}),
        (render.ON_DEMAND, False, {"on-demand"}),
        (render.SPOT, True, {"spot", "on-demand"}),
        (render.ON_DEMAND, True, {"on-demand"}),  # an on-demand group never takes a spot worker
    ],
)
def test_workers_follow_the_groups_capacity_unless_mixing_is_allowed(capacity, mixed, worker_capacities):
    body, spec = rendered({"gpu": GROUPS["gpu"] | {"mixedCapacityGroups": mixed}})
    template = render.engine_group(body, spec, capacity)["spec"]["leaderWorkerTemplate"]
    spotrag_terms = lambda t: {  # noqa: E731
        value for term in terms(t) for e in term if e["key"] == render.LABEL_CAPACITY for value in e["values"]
    }
    assert spotrag_terms(template["leaderTemplate"]) == {capacity}
    assert spotrag_terms(template["workerTemplate"]) == worker_capacities


def test_one_node_engines_stay_plain_pods():
    body = ragdeployment()
    assert render.engine_unit(body, defaulted_spec(body), render.SPOT)["kind"] == "Pod"


# --- planned as one unit ---------------------------------------------------------

TIMING = DrainTiming(grace=5, timeout=90, margin=10)
NOTICE = {
    "metadata": {"name": "n"},
    "spec": {
        "taints": [{"key": "karpenter.sh/disrupted", "effect": "NoSchedule", "timeAdded": "2026-12-03T11:59:30Z"}]
    },
}


def group(name: str = "g1", *, leader_node: str = "leader-node", worker_node: str = "worker-node", **facts) -> Engine:
    values = dict(
        name=name,
        capacity=render.SPOT,
        spec_hash="h",
        serving=True,
        ready=True,
        failed=False,
        terminating=False,
        created=NOW - datetime.timedelta(minutes=10),
        node=leader_node,
        group=True,
        leader=f"{name}-0",
        group_nodes=(leader_node, worker_node),
    )
    return Engine(**(values | facts))


@pytest.mark.parametrize(
    "noticed, drained",
    [("leader-node", True), ("worker-node", True), ("elsewhere", False)],
)
def test_a_notice_for_any_node_of_a_group_drains_the_whole_group(noticed, drained):
    signal = node_signal(NOTICE, NOW)
    assert signal is not None
    plan = plan_engines(
        [group()], target={render.SPOT: 1}, spec_hash="h", now=NOW, timing=TIMING, node_signals={noticed: signal}
    )
    assert [d.name for d in plan.drain] == (["g1"] if drained else [])
    assert plan.create == ([render.SPOT] if drained else [])  # its replacement: one group


def test_engine_from_group_is_ready_only_when_every_pod_is():
    lws = {
        "metadata": {
            "name": "g1",
            "labels": {render.LABEL_CAPACITY: "spot", render.LABEL_SERVING: "true", render.LABEL_SPEC_HASH: "h"},
            "creationTimestamp": "2026-12-03T11:50:00Z",
        },
        "spec": {"leaderWorkerTemplate": {"size": 2}},
    }

    def pod(worker: int, node: str | None, ready: bool) -> dict:
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        if node is None:
            conditions.append(
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                }
            )
        return {
            "metadata": {"name": f"g1-0-{worker}", "labels": {render.LWS_WORKER_INDEX_LABEL: str(worker)}},
            "spec": {"nodeName": node} if node else {},
            "status": {"conditions": conditions},
        }

    whole = Engine.from_group(lws, [pod(0, "a", True), pod(1, "b", True)])
    assert whole.ready and whole.leader == "g1-0-0" and whole.nodes == ("a", "b") and whole.unschedulable is None
    stuck = Engine.from_group(lws, [pod(0, "a", True), pod(1, None, False)])
    assert not stuck.ready and stuck.unschedulable.startswith("0/4 nodes are available")
    empty = Engine.from_group(lws, [])
    assert not empty.ready and empty.leader is None and empty.serving


def observed(engines: list[Engine], nodes: dict | None = None, overrides: dict | None = None) -> Observed:
    body = ragdeployment(GROUPS | (overrides or {}))
    body["status"] = {}
    return Observed(
        body=body,
        spec=defaulted_spec(body),
        now=NOW,
        engines=engines,
        nodes=nodes or {},
        queued_tokens=0.0,
        metric_problem="",
        found={("ConfigMap", "handbook-docs"): {"data": {}}},
        index_jobs=[],
        index_result={},
    )


def test_a_group_is_drained_through_its_set_and_leader_and_deleted_as_its_set():
    body, spec = rendered()
    spec_hash = render.engine_spec_hash(spec)
    noticed = group(spec_hash=spec_hash)
    plan = plan_reconcile(observed([noticed], nodes={"worker-node": NOTICE}), None)
    (drain,) = plan.drains
    assert drain.targets == (
        (render.LWS_API_VERSION, render.LWS_KIND, "g1"),
        ("v1", "Pod", "g1-0"),
    )
    assert [unit["kind"] for _, unit in plan.creates] == ["LeaderWorkerSet"]
    drained = dataclasses.replace(
        noticed, serving=False, drain_since=NOW - datetime.timedelta(seconds=30), running_requests=0
    )
    (delete,) = plan_reconcile(observed([drained]), None).deletes
    assert (delete.kind, delete.name) == (render.LWS_KIND, "g1")
    assert "engine group" in delete.event.message


def test_scaling_and_status_count_groups_and_price_every_node():
    body, spec = rendered()
    spec_hash = render.engine_spec_hash(spec)
    overrides = {"pricing": {"onDemandPerGpuHour": 1.0, "spotPerGpuHour": 0.5}}
    baseline = group(spec_hash=spec_hash, capacity=render.ON_DEMAND)
    plan = plan_reconcile(observed([baseline], overrides=overrides), None)
    assert plan.creates == [] and plan.status["engines"] == "1/1" and plan.status["readyReplicas"] == 1
    # One on-demand group of 2 nodes x 1 GPU at $1 per GPU-hour.
    assert plan.status["costPerHour"] == "$2.00"


def node(name: str, capacity: str, instance: str, gpus: int, **spec) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {"karpenter.sh/capacity-type": capacity, "node.kubernetes.io/instance-type": instance},
        },
        "spec": spec,
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def test_a_group_with_no_nodes_to_go_to_is_pending_with_a_condition_naming_the_nodes_that_would_fit():
    overrides = {"gpu": GROUPS["gpu"] | {"instanceTypes": ["g6.12xlarge"]}, "model": {"tensorParallelSize": 4}}
    body, spec = rendered(overrides)
    pending = group(
        spec_hash=render.engine_spec_hash(spec),
        capacity=render.ON_DEMAND,
        ready=False,
        node=None,
        group_nodes=(),
        unschedulable="0/6 nodes are available: 6 node(s) didn't match Pod's node affinity/selector.",
    )
    nodes = {
        "od-big": node("od-big", "on-demand", "g6.12xlarge", 4),
        "od-big-cordoned": node("od-big-cordoned", "on-demand", "g6.12xlarge", 4, unschedulable=True),
        "od-small": node("od-small", "on-demand", "g6.2xlarge", 1),
        "spot-big": node("spot-big", "spot", "g6.12xlarge", 4),
    }
    plan = plan_reconcile(observed([pending], nodes=nodes, overrides=overrides), None)
    condition = next(c for c in plan.status["conditions"] if c["type"] == "GroupsSchedulable")
    assert condition["status"] == "False" and condition["reason"] == "NoNodesForGroup"
    message = condition["message"]
    assert "needs 2 nodes at once, all spot or all on-demand, each with 4 free nvidia.com/gpu" in message
    assert "of instance type g6.12xlarge" in message
    assert "on-demand nodes that would fit: od-big (1 of the 2 a group needs)" in message
    assert "didn't match Pod's node affinity" in message  # the scheduler's own words


# --- the box's LeaderWorkerSet controller, over HTTP ---------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    with KubeAPIServer() as server:
        yield str(server.write_kubeconfig(tmp_path / "kubeconfig"))


async def test_the_box_lws_controller_creates_a_group_and_recreates_it_when_a_pod_goes(api):
    client = AsyncKube.from_kubeconfig(api)
    await leaderworkersets.install_crd(client)
    pods = Informer(client, collection_path("v1", "pods"), name="pods")
    sets = Informer(client, collection_path(leaderworkersets.API_VERSION, leaderworkersets.PLURAL), name="lws")
    controller = leaderworkersets.LeaderWorkerSetController(client, sets, pods, resync=0.5)
    tasks = [asyncio.create_task(t.run()) for t in (pods, sets, controller)]
    try:
        body, spec = rendered()
        lws = render.engine_group(body, spec, render.SPOT)
        lws["metadata"].pop("ownerReferences")  # no RAGDeployment here to own it
        created = await client.create(collection_path(render.LWS_API_VERSION, "leaderworkersets", "default"), lws)
        name = created["metadata"]["name"]

        def group_pods() -> dict[str, dict]:
            return {
                p["metadata"]["name"]: p
                for p in pods.items()
                if (p["metadata"].get("labels") or {}).get(render.LWS_NAME_LABEL) == name
                and not p["metadata"].get("deletionTimestamp")
            }

        await eventually_async(lambda: len(group_pods()) == 2, what="the group's two pods", timeout=60)
        first = group_pods()
        leader, worker = first[f"{name}-0"], first[f"{name}-0-1"]
        assert leader["metadata"]["labels"][render.LWS_WORKER_INDEX_LABEL] == "0"
        assert leader["metadata"]["labels"][render.LABEL_COMPONENT] == "engine"
        assert worker["metadata"]["labels"][render.LABEL_COMPONENT] == render.COMPONENT_WORKER
        env = {e["name"]: e["value"] for e in worker["spec"]["containers"][0]["env"] if "value" in e}
        assert env["LWS_LEADER_ADDRESS"] == f"{name}-0.{name}.default"
        assert (env["LWS_GROUP_SIZE"], env["LWS_WORKER_INDEX"]) == ("2", "1")

        # A worker goes (its node was taken): the whole group is created again.
        await client.delete(object_path("v1", "pods", f"{name}-0-1", "default"), grace_period_seconds=0)
        old_uids = {p["metadata"]["uid"] for p in first.values()}
        await eventually_async(
            lambda: len(group_pods()) == 2 and not {p["metadata"]["uid"] for p in group_pods().values()} & old_uids,
            what="the group recreated, leader included",
            timeout=60,
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def test_a_draining_group_recreated_by_its_set_has_its_new_leader_taken_out_of_serving_again():
    body, spec = rendered()
    recreated = group(
        spec_hash=render.engine_spec_hash(spec),
        serving=False,
        drain_since=NOW - datetime.timedelta(seconds=2),
        drain_deadline=NOW + datetime.timedelta(seconds=60),
        ready=False,
        leader_serving=True,
    )
    plan = plan_reconcile(observed([recreated]), None)
    (relabel,) = plan.drains
    assert relabel.targets == (("v1", "Pod", "g1-0"),) and relabel.events == ()
    assert relabel.patch == {"metadata": {"labels": {render.LABEL_SERVING: "false"}}}


# --- observed over HTTP --------------------------------------------------------


def test_observe_sees_each_group_as_one_engine_with_every_node_it_holds(api):
    """The operator's read of a RAGDeployment with engine groups, against the
    API stand-in: a set with its leader and worker, and a set whose pods are
    not there yet, become two engines; the workers' nodes are read too."""
    import httpx

    from spotrag_operator.observe import observe
    from spotrag_runtime.kube import Kube, api_client

    async def install() -> None:
        client = AsyncKube.from_kubeconfig(api)
        try:
            await leaderworkersets.install_crd(client)
        finally:
            await client.close()

    asyncio.run(install())
    kube = Kube(api_client(api))
    body, spec = rendered()
    for name in ("node-a", "node-b"):
        kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})

    def unowned(lws: dict) -> dict:
        lws["metadata"].pop("ownerReferences")  # no RAGDeployment stored here to own it
        return lws

    placed = kube.create(unowned(render.engine_group(body, spec, render.SPOT)))
    waiting = kube.create(unowned(render.engine_group(body, spec, render.ON_DEMAND)))
    for worker, node in ((0, "node-a"), (1, "node-b")):
        pod = leaderworkersets.group_pod(placed, 0, worker, 2)
        pod["spec"]["nodeName"] = node
        kube.create(pod)
    with httpx.Client() as http:
        seen = observe(kube, http, body, now=NOW)
    engines = {e.name: e for e in seen.engines}
    assert set(engines) == {placed["metadata"]["name"], waiting["metadata"]["name"]}
    group_a = engines[placed["metadata"]["name"]]
    assert group_a.group and group_a.leader == f"{placed['metadata']['name']}-0"
    assert group_a.nodes == ("node-a", "node-b") and group_a.capacity == render.SPOT and group_a.serving
    group_b = engines[waiting["metadata"]["name"]]
    assert group_b.leader is None and group_b.capacity == render.ON_DEMAND and not group_b.ready
    assert set(seen.nodes) == {"node-a", "node-b"}


@pytest.mark.parametrize("version", ["1.29.0", "1.31.0", "1.33.0"])
def test_the_groups_pod_templates_validate_strictly_as_pods(version):
    import json

    import kubernetes_validate

    body, spec = rendered({"gpu": GROUPS["gpu"] | {"mixedCapacityGroups": True}})
    template = render.engine_group(body, spec, render.SPOT)["spec"]["leaderWorkerTemplate"]
    for part in ("leaderTemplate", "workerTemplate"):
        pod = json.loads(json.dumps({"apiVersion": "v1", "kind": "Pod", **template[part]}))
        pod["metadata"]["name"] = f"grouped-{part.lower()}"
        kubernetes_validate.validate(pod, version, strict=True)
