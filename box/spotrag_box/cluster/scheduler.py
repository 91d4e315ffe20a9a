"""The scheduler: binds Pending pods to nodes through the pods/binding
subresource, or marks them PodScheduled=False (reason Unschedulable) with
the scheduler's own wording when nothing fits. A Pending engine pod with
that condition is what a spot shortage looks like to the operator."""

from __future__ import annotations

import logging

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, object_path

from .controller import Controller, EventRecorder, now_iso
from .scheduler_plugins import schedule

log = logging.getLogger(__name__)

SCHEDULER_NAME = "default-scheduler"


def is_pending_unbound(pod: dict) -> bool:
    spec = pod.get("spec") or {}
    return (
        not spec.get("nodeName")
        and not pod["metadata"].get("deletionTimestamp")
        and (spec.get("schedulerName") or SCHEDULER_NAME) == SCHEDULER_NAME
        and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
    )


def scheduled_condition(pod: dict) -> dict | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None)


class Scheduler(Controller):
    name = "scheduler"

    def __init__(self, client: AsyncKube, pods: Informer, nodes: Informer, *, resync: float):
        super().__init__(resync=resync)
        self.client = client
        self.pods = pods
        self.nodes = nodes
        self.events = EventRecorder(client, SCHEDULER_NAME)
        # Bindings made but not yet seen in the cache ("assumed" pods, as in
        # kube-scheduler), so two pods never take the same GPU in one pass.
        self.assumed: dict[str, tuple[str, dict]] = {}
        pods.subscribe(self.wake)
        nodes.subscribe(self.wake)

    async def reconcile(self) -> None:
        if not (self.pods.synced.is_set() and self.nodes.synced.is_set()):
            return
        pods = self.pods.items()
        cached = {p["metadata"]["uid"]: p for p in pods}
        for uid in list(self.assumed):
            if uid not in cached or (cached[uid].get("spec") or {}).get("nodeName"):
                del self.assumed[uid]
        nodes = sorted(self.nodes.items(), key=lambda n: n["metadata"]["name"])
        pods_by_node: dict[str, list[dict]] = {}
        for pod in pods:
            if node := (pod.get("spec") or {}).get("nodeName"):
                pods_by_node.setdefault(node, []).append(pod)
        for node, pod in self.assumed.values():
            pods_by_node.setdefault(node, []).append(pod)

        pending = [p for p in pods if is_pending_unbound(p) and p["metadata"]["uid"] not in self.assumed]
        pending.sort(
            key=lambda p: (-((p.get("spec") or {}).get("priority") or 0), p["metadata"].get("creationTimestamp") or "")
        )
        for pod in pending:
            decision = schedule(pod, nodes, pods_by_node)
            if decision.node is None:
                await self._mark_unschedulable(pod, decision.message)
                continue
            if await self._bind(pod, decision.node):
                self.assumed[pod["metadata"]["uid"]] = (decision.node, pod)
                pods_by_node.setdefault(decision.node, []).append(pod)

    async def _bind(self, pod: dict, node: str) -> bool:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            await self.client.create(object_path("v1", "pods", meta["name"], meta["namespace"], "binding"), binding)
        except KubeError as error:
            if error.status in (404, 409):
                return False  # gone, or bound meanwhile: the cache will tell
            raise
        log.info("bound %s/%s to %s", meta["namespace"], meta["name"], node)
        await self.events.record(
            pod | {"kind": "Pod", "apiVersion": "v1"},
            "Normal",
            "Scheduled",
            f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}",
        )
        return True

    async def _mark_unschedulable(self, pod: dict, message: str) -> None:
        current = scheduled_condition(pod) or {}
        if current.get("status") == "False" and current.get("message") == message:
            return
        meta = pod["metadata"]
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": current.get("lastTransitionTime") if current.get("status") == "False" else now_iso(),
        }
        others = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        try:
            await self.client.patch(
                object_path("v1", "pods", meta["name"], meta["namespace"], "status"),
                {"status": {"phase": "Pending", "conditions": [*others, condition]}},
            )
        except KubeError as error:
            if error.status != 404:
                raise
            return
        log.info("%s/%s unschedulable: %s", meta["namespace"], meta["name"], message)
        await self.events.record(pod | {"kind": "Pod", "apiVersion": "v1"}, "Warning", "FailedScheduling", message)
