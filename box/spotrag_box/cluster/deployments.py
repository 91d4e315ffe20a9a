"""A minimal Deployment controller: Deployment → pods of its template,
rolled by the RollingUpdate rules (maxSurge, maxUnavailable) or Recreate,
with the status `kubectl rollout status` reads.

ReplicaSets are left out: pods are owned by the Deployment directly and
carry the template's hash in `pod-template-hash`, which is what a
ReplicaSet would add. Everything a consumer of the pods sees (labels,
owner chain ending in the Deployment, readiness) is as in a cluster.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

from .controller import Controller, now_iso
from .endpointslices import pod_is_ready

log = logging.getLogger(__name__)

TEMPLATE_HASH_LABEL = "pod-template-hash"
EXPECTATION_TIMEOUT_SECONDS = 30.0


def template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _scaled(value: int | str | None, replicas: int, default: str, *, round_up: bool) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        exact = replicas * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def owned_by(pod: dict, owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in pod["metadata"].get("ownerReferences") or [])


class DeploymentController(Controller):
    name = "deployment-controller"

    def __init__(self, client: AsyncKube, deployments: Informer, pods: Informer, *, resync: float):
        super().__init__(resync=resync)
        self.client = client
        self.deployments = deployments
        self.pods = pods
        # Pods created or deleted but not yet seen so in the cache, by
        # deployment uid (the ReplicaSet controller's "expectations"), so a
        # pass on a stale cache never creates or deletes twice.
        self.created: dict[str, dict[str, float]] = {}
        self.deleted: dict[str, dict[str, float]] = {}
        deployments.subscribe(self.wake)
        pods.subscribe(self.wake)

    async def reconcile(self) -> None:
        if not (self.deployments.synced.is_set() and self.pods.synced.is_set()):
            return
        for deployment in self.deployments.items():
            if deployment["metadata"].get("deletionTimestamp"):
                continue
            await self._reconcile_one(deployment)

    def _settle_expectations(self, uid: str, pods: list[dict]) -> None:
        names = {p["metadata"]["name"] for p in pods}
        alive = {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}
        now = time.monotonic()
        created = self.created.setdefault(uid, {})
        for name, since in list(created.items()):
            if name in names or now - since > EXPECTATION_TIMEOUT_SECONDS:
                del created[name]
        deleted = self.deleted.setdefault(uid, {})
        for name, since in list(deleted.items()):
            if name not in alive or now - since > EXPECTATION_TIMEOUT_SECONDS:
                del deleted[name]

    async def _reconcile_one(self, deployment: dict) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        uid = meta["uid"]
        replicas = spec.get("replicas", 1)
        current_hash = template_hash(spec["template"])
        owned = [p for p in self.pods.items() if p["metadata"]["namespace"] == meta["namespace"] and owned_by(p, uid)]
        self._settle_expectations(uid, owned)
        if self.created[uid]:
            return  # wait until the cache shows the pods just created
        live = [
            p
            for p in owned
            if not p["metadata"].get("deletionTimestamp") and p["metadata"]["name"] not in self.deleted[uid]
        ]
        live = [p for p in live if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        new = [p for p in live if (p["metadata"].get("labels") or {}).get(TEMPLATE_HASH_LABEL) == current_hash]
        old = [p for p in live if p not in new]
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        if strategy.get("type") == "Recreate":
            max_surge, max_unavailable = 0, replicas
        else:
            max_surge = _scaled(rolling.get("maxSurge"), replicas, "25%", round_up=True)
            max_unavailable = _scaled(rolling.get("maxUnavailable"), replicas, "25%", round_up=False)
            if max_surge == 0 and max_unavailable == 0:
                max_unavailable = 1  # as the API server's validation requires one of them positive
        # Old pods go first where they are not ready (they serve nothing), then
        # ready ones as long as enough ready pods remain.
        ready_new = [p for p in new if pod_is_ready(p)]
        ready_old = [p for p in old if pod_is_ready(p)]
        to_delete = []
        if strategy.get("type") == "Recreate":
            to_delete = old
        else:
            to_delete = [p for p in old if not pod_is_ready(p)]
            available = len(ready_new) + len(ready_old)
            for pod in ready_old:
                if available - 1 >= replicas - max_unavailable:
                    to_delete.append(pod)
                    available -= 1
        if len(new) > replicas:
            surplus = sorted(new, key=lambda p: (pod_is_ready(p), p["metadata"].get("creationTimestamp") or ""))
            to_delete += surplus[: len(new) - replicas]
        remaining_old = len(old) - len([p for p in to_delete if p in old])
        creatable = 0
        if strategy.get("type") == "Recreate":
            if not old:
                creatable = replicas - len(new)
        else:
            creatable = min(replicas - len(new), replicas + max_surge - len(new) - remaining_old)
        for pod in to_delete:
            await self._delete_pod(deployment, pod)
        for _ in range(max(0, creatable)):
            await self._create_pod(deployment, current_hash)
        await self._write_status(deployment, new, ready_new, live)

    async def _create_pod(self, deployment: dict, current_hash: str) -> None:
        meta = deployment["metadata"]
        template = copy.deepcopy(deployment["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-{current_hash}-",
                "namespace": meta["namespace"],
                "labels": dict(pod_meta.get("labels") or {}) | {TEMPLATE_HASH_LABEL: current_hash},
                "annotations": dict(pod_meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template.get("spec") or {},
        }
        created = await self.client.create(collection_path("v1", "pods", meta["namespace"]), pod)
        self.created[meta["uid"]][created["metadata"]["name"]] = time.monotonic()
        log.info("deployment %s/%s: created pod %s", meta["namespace"], meta["name"], created["metadata"]["name"])

    async def _delete_pod(self, deployment: dict, pod: dict) -> None:
        meta = pod["metadata"]
        await self.client.delete(object_path("v1", "pods", meta["name"], meta["namespace"]))
        self.deleted[deployment["metadata"]["uid"]][meta["name"]] = time.monotonic()
        log.info(
            "deployment %s/%s: deleted pod %s",
            deployment["metadata"]["namespace"],
            deployment["metadata"]["name"],
            meta["name"],
        )

    async def _write_status(self, deployment: dict, new: list[dict], ready_new: list[dict], live: list[dict]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        replicas = spec.get("replicas", 1)
        ready = [p for p in live if pod_is_ready(p)]
        old_status = deployment.get("status") or {}
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        available = len(ready) >= replicas - _scaled(rolling.get("maxUnavailable"), replicas, "25%", round_up=False)
        complete = len(ready_new) == replicas and len(live) == replicas

        def condition(kind: str, ok: bool, reason: str, message: str) -> dict:
            previous = next((c for c in old_status.get("conditions") or [] if c.get("type") == kind), {})
            status = "True" if ok else "False"
            since = previous.get("lastTransitionTime") if previous.get("status") == status else now_iso()
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "lastUpdateTime": since,
            }

        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(live),
            "updatedReplicas": len(new),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
            "unavailableReplicas": max(0, replicas - len(ready)),
            "conditions": [
                condition(
                    "Available",
                    available,
                    "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                    "Deployment has minimum availability."
                    if available
                    else "Deployment does not have minimum availability.",
                ),
                condition(
                    "Progressing",
                    True,
                    "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                    f'Deployment "{meta["name"]}" has successfully progressed.'
                    if complete
                    else f'Deployment "{meta["name"]}" is progressing.',
                ),
            ],
        }
        if all(old_status.get(k) == v for k, v in status.items() if k != "conditions") and [
            (c["type"], c["status"], c["reason"]) for c in old_status.get("conditions") or []
        ] == [(c["type"], c["status"], c["reason"]) for c in status["conditions"]]:
            return
        try:
            await self.client.patch(
                object_path("apps/v1", "deployments", meta["name"], meta["namespace"], "status"), {"status": status}
            )
        except KubeError as error:
            if error.status != 404:
                raise
