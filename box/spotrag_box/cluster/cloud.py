"""The cloud under the cluster: instances that become Nodes, node pools kept
at their size (as an Auto Scaling group or a GKE node pool does), spot
capacity that can run out per zone, and spot interruptions.

An interruption is what the clusters we target see:

- a notice, marked on the Node the way the tool that relays it marks it:

  - ``aws``: AWS Node Termination Handler (taint mode): label
    ``aws-node-termination-handler/event-id``, taint
    ``aws-node-termination-handler/spot-itn=<event-id>:NoSchedule``, cordon;
  - ``karpenter``: taint ``karpenter.sh/disrupted:NoSchedule``;
  - ``gke``: taint ``cloud.google.com/impending-node-termination:NoSchedule``;

  plus an Event on the Node (reasons as those tools word them); the tools
  would then drain the node too, which here is left to the operator;
- after the notice period (AWS gives 120 s, GCE and Azure 30 s; the box
  takes what it is told) the instance is gone: its processes die at once,
  the Node object is deleted and the pod garbage collector removes its pods.

Then the pool launches a replacement, if the zone has spot capacity.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
from dataclasses import dataclass

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

from .controller import Controller, EventRecorder, now_iso
from .kubelet import HOST_IP, Kubelet
from .node_pools import ON_DEMAND, SPOT, ClusterProfile, NodePool, Timing

log = logging.getLogger(__name__)

INTERRUPTION_STYLES = ("aws", "karpenter", "gke")
NTH_SPOT_TAINT = "aws-node-termination-handler/spot-itn"
NTH_EVENT_ID_LABEL = "aws-node-termination-handler/event-id"
KARPENTER_DISRUPTED_TAINT = "karpenter.sh/disrupted"
GKE_TERMINATION_TAINT = "cloud.google.com/impending-node-termination"


@dataclass(frozen=True)
class Interruption:
    node: str
    style: str
    notice_seconds: float
    deadline: datetime.datetime
    event_id: str


def node_manifest(pool: NodePool, name: str) -> dict:
    instance = pool.instance
    capacity = {
        "cpu": instance.cpu,
        "memory": instance.memory,
        "pods": str(instance.max_pods),
        "ephemeral-storage": "100Gi",
    }
    if instance.gpus:
        capacity[instance.accelerator] = str(instance.gpus)
    instance_id = "i-" + secrets.token_hex(8)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": pool.node_labels(name),
            "annotations": {"box.spotrag.io/instance-id": instance_id},
        },
        "spec": {"providerID": f"aws:///{pool.zone}/{instance_id}", "taints": pool.node_taints()},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status (simulated)",
                    "lastHeartbeatTime": now_iso(),
                    "lastTransitionTime": now_iso(),
                },
                {
                    "type": "MemoryPressure",
                    "status": "False",
                    "reason": "KubeletHasSufficientMemory",
                    "lastHeartbeatTime": now_iso(),
                    "lastTransitionTime": now_iso(),
                },
                {
                    "type": "DiskPressure",
                    "status": "False",
                    "reason": "KubeletHasNoDiskPressure",
                    "lastHeartbeatTime": now_iso(),
                    "lastTransitionTime": now_iso(),
                },
                {
                    "type": "PIDPressure",
                    "status": "False",
                    "reason": "KubeletHasSufficientPID",
                    "lastHeartbeatTime": now_iso(),
                    "lastTransitionTime": now_iso(),
                },
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": "v1.33.0-spotrag-box",
                "containerRuntimeVersion": "spotrag-box://local-processes",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "osImage": "cluster in a box (simulated)",
                "kernelVersion": "",
                "machineID": instance_id,
                "systemUUID": instance_id,
                "bootID": instance_id,
                "kubeProxyVersion": "",
            },
        },
    }


class Cloud(Controller):
    name = "cloud"

    def __init__(
        self, client: AsyncKube, nodes: Informer, kubelet: Kubelet, profile: ClusterProfile, *, timing: Timing
    ):
        super().__init__(resync=timing.resync)
        self.client = client
        self.nodes = nodes
        self.kubelet = kubelet
        self.profile = profile
        self.timing = timing
        self.events = EventRecorder(client, "cloud")
        self.pools = {p.name: p for p in profile.pools}
        self.spot_available: dict[str, bool] = {zone: True for zone in profile.zones}
        self.instances: dict[str, str] = {}  # node name → pool name
        self.interruptions: dict[str, Interruption] = {}
        self._provisioning: dict[str, int] = {name: 0 for name in self.pools}
        self._serial: dict[str, int] = {name: 0 for name in self.pools}
        self._tasks: set[asyncio.Task] = set()
        nodes.subscribe(self.wake)

    def capacity_available(self, pool: NodePool) -> bool:
        return pool.capacity_type == ON_DEMAND or self.spot_available.get(pool.zone, True)

    async def launch_initial(self) -> None:
        """The pools at their size, at once (the cluster existed before the test)."""
        for pool in self.pools.values():
            if not self.capacity_available(pool):
                continue
            for _ in range(pool.size - self._live(pool.name)):
                await self._launch(pool)

    def _live(self, pool: str) -> int:
        return sum(1 for node, owner in self.instances.items() if owner == pool and node not in self.interruptions)

    async def _launch(self, pool: NodePool) -> str:
        self._serial[pool.name] += 1
        name = f"{pool.name}-{self._serial[pool.name]}"
        manifest = node_manifest(pool, name)
        status = manifest.pop("status")
        try:
            await self.client.create(collection_path("v1", "nodes"), manifest)
        except KubeError as error:
            if error.status != 409:
                raise
        # Status through its subresource: a server may ignore it on create.
        await self.client.patch(object_path("v1", "nodes", name, subresource="status"), {"status": status})
        self.instances[name] = pool.name
        log.info("cloud: node %s joined (%s %s in %s)", name, pool.capacity_type, pool.instance_type, pool.zone)
        return name

    async def reconcile(self) -> None:
        """Keep each pool at its size, as far as capacity allows."""
        for pool in self.pools.values():
            missing = pool.size - self._live(pool.name) - self._provisioning[pool.name]
            if missing <= 0 or not self.capacity_available(pool):
                continue
            for _ in range(missing):
                self._provisioning[pool.name] += 1
                self._spawn(self._provision(pool))

    async def _provision(self, pool: NodePool) -> None:
        try:
            await asyncio.sleep(self.timing.node_provision)
            if self.capacity_available(pool):
                await self._launch(pool)
        finally:
            self._provisioning[pool.name] -= 1
            self.wake()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set_spot_capacity(self, available: bool, zone: str | None = None) -> None:
        for name in [zone] if zone else list(self.spot_available):
            if name not in self.spot_available:
                raise ValueError(f"no zone {name!r} (zones: {', '.join(self.spot_available)})")
            self.spot_available[name] = available
        log.info("cloud: spot capacity %s in %s", "available" if available else "exhausted", zone or "every zone")
        self.wake()

    async def interrupt(self, node: str, *, style: str = "aws", notice_seconds: float = 120.0) -> Interruption:
        if style not in INTERRUPTION_STYLES:
            raise ValueError(f"unknown interruption style {style!r}: use one of {', '.join(INTERRUPTION_STYLES)}")
        pool_name = self.instances.get(node)
        if pool_name is None:
            raise ValueError(f"no simulated node {node!r} (nodes: {', '.join(sorted(self.instances))})")
        if self.pools[pool_name].capacity_type != SPOT:
            raise ValueError(f"node {node!r} is on-demand: only spot instances are interrupted")
        if node in self.interruptions:
            return self.interruptions[node]
        deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=notice_seconds)
        event_id = f"spot-itn-{secrets.token_hex(16)}"
        interruption = Interruption(node, style, notice_seconds, deadline, event_id)
        self.interruptions[node] = interruption
        await self._mark(interruption)
        self._spawn(self._terminate_at_deadline(interruption))
        return interruption

    async def _mark(self, interruption: Interruption) -> None:
        path = object_path("v1", "nodes", interruption.node)
        current = await self.client.get(path)
        if current is None:
            return
        taints = list((current.get("spec") or {}).get("taints") or [])
        patch: dict = {"metadata": {}, "spec": {}}
        deadline = interruption.deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
        if interruption.style == "aws":
            taints.append({"key": NTH_SPOT_TAINT, "value": interruption.event_id[:63], "effect": "NoSchedule"})
            patch["metadata"]["labels"] = {NTH_EVENT_ID_LABEL: interruption.event_id[:63]}
            patch["spec"]["unschedulable"] = True
            # What the node lifecycle controller adds to a cordoned node.
            taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
            reason, message = "SpotInterruption", f"Spot Interruption notice for instance, scheduled at {deadline}"
        elif interruption.style == "karpenter":
            taints.append({"key": KARPENTER_DISRUPTED_TAINT, "effect": "NoSchedule"})
            reason, message = (
                "SpotInterrupted",
                f"Spot interruption warning was triggered; instance terminates at {deadline}",
            )
        else:
            taints.append({"key": GKE_TERMINATION_TAINT, "value": "true", "effect": "NoSchedule"})
            reason, message = "PreemptionNotice", f"Node is about to be preempted at {deadline}"
        patch["spec"]["taints"] = taints
        await self.client.patch(path, patch)
        await self.events.record(current | {"kind": "Node", "apiVersion": "v1"}, "Warning", reason, message)
        log.info(
            "cloud: %s notice for %s (%s, %ss)",
            interruption.style,
            interruption.node,
            interruption.event_id,
            interruption.notice_seconds,
        )

    async def _terminate_at_deadline(self, interruption: Interruption) -> None:
        await asyncio.sleep(interruption.notice_seconds)
        await self.terminate(interruption.node)

    async def terminate(self, node: str) -> None:
        """The instance is gone, now."""
        self.kubelet.node_lost(node)
        await self.client.delete(object_path("v1", "nodes", node))
        self.instances.pop(node, None)
        self.interruptions.pop(node, None)
        log.info("cloud: node %s terminated", node)
        self.wake()

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
