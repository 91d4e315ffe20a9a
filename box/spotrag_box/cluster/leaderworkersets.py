"""A minimal LeaderWorkerSet controller (kubernetes-sigs/lws, API
leaderworkerset.x-k8s.io/v1): each of a LeaderWorkerSet's `replicas`
groups is `leaderWorkerTemplate.size` pods, a leader from `leaderTemplate`
and workers from `workerTemplate`, with the labels and environment the real
controller gives them:

- labels leaderworkerset.sigs.k8s.io/name, /group-index, /worker-index
  (0 for the leader), /group-key; annotation /size;
- env LWS_LEADER_ADDRESS (the leader's DNS name under the set's headless
  Service), LWS_GROUP_SIZE, LWS_WORKER_INDEX in every container;
- pod names <set>-<group> for leaders, <set>-<group>-<worker> for workers.

`restartPolicy: RecreateGroupOnPodRestart`, the upstream default: when a pod
of a group goes (its node lost, deleted, failed), the rest of the group is
deleted too and the whole group is created again once its old pods are gone.
Left out: rolling updates of the templates (spotrag replaces a group with a
new LeaderWorkerSet instead), subgroups, the headless Service, status beyond
replicas and readyReplicas. Pods are owned by the LeaderWorkerSet directly
(upstream: through StatefulSets), so deleting it collects them.
"""

from __future__ import annotations

import copy
import logging
import time

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

from .controller import Controller
from .deployments import EXPECTATION_TIMEOUT_SECONDS, owned_by
from .endpointslices import pod_is_ready

log = logging.getLogger(__name__)

API_VERSION = "leaderworkerset.x-k8s.io/v1"
PLURAL = "leaderworkersets"
NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"
SIZE_ANNOTATION = "leaderworkerset.sigs.k8s.io/size"
LEADER_NAME_ANNOTATION = "leaderworkerset.sigs.k8s.io/leader-name"

# The CRD the box installs, as installing the LWS controller would: the
# schema is left open (the box's controller reads what it needs).
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.leaderworkerset.x-k8s.io"},
    "spec": {
        "group": "leaderworkerset.x-k8s.io",
        "scope": "Namespaced",
        "names": {
            "kind": "LeaderWorkerSet",
            "listKind": "LeaderWorkerSetList",
            "plural": PLURAL,
            "singular": "leaderworkerset",
            "shortNames": ["lws"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


async def install_crd(client: AsyncKube) -> None:
    try:
        await client.create(collection_path("apiextensions.k8s.io/v1", "customresourcedefinitions"), CRD)
    except KubeError as error:
        if error.status != 409:
            raise


def _labels(pod: dict) -> dict:
    return pod["metadata"].get("labels") or {}


def _gone_or_failed(pod: dict) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp")) or (pod.get("status") or {}).get("phase") in (
        "Failed",
        "Succeeded",
    )


def group_pod(lws: dict, group: int, worker: int, size: int) -> dict:
    """Pod `worker` (0: the leader) of group `group`, as the LWS controller makes it."""
    meta = lws["metadata"]
    template_set = lws["spec"]["leaderWorkerTemplate"]
    template = copy.deepcopy(
        template_set.get("leaderTemplate")
        if worker == 0 and template_set.get("leaderTemplate")
        else template_set["workerTemplate"]
    )
    leader_name = f"{meta['name']}-{group}"
    name = leader_name if worker == 0 else f"{leader_name}-{worker}"
    pod_meta = template.get("metadata") or {}
    labels = dict(pod_meta.get("labels") or {}) | {
        NAME_LABEL: meta["name"],
        GROUP_INDEX_LABEL: str(group),
        WORKER_INDEX_LABEL: str(worker),
        GROUP_KEY_LABEL: f"{meta['uid'][:8]}-{group}",
    }
    annotations = dict(pod_meta.get("annotations") or {}) | {SIZE_ANNOTATION: str(size)}
    if worker:
        annotations[LEADER_NAME_ANNOTATION] = leader_name
    pod_spec = template.get("spec") or {}
    env = [
        {"name": "LWS_LEADER_ADDRESS", "value": f"{leader_name}.{meta['name']}.{meta['namespace']}"},
        {"name": "LWS_GROUP_SIZE", "value": str(size)},
        {"name": "LWS_WORKER_INDEX", "value": str(worker)},
    ]
    for container in pod_spec.get("containers") or []:
        container["env"] = [*(container.get("env") or []), *env]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "LeaderWorkerSet",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec | {"hostname": name, "subdomain": meta["name"]},
    }


class LeaderWorkerSetController(Controller):
    name = "leaderworkerset-controller"

    def __init__(self, client: AsyncKube, sets: Informer, pods: Informer, *, resync: float):
        super().__init__(resync=resync)
        self.client = client
        self.sets = sets
        self.pods = pods
        # Pods created but not yet in the cache, by set uid (as the Deployment controller keeps them).
        self.created: dict[str, dict[str, float]] = {}
        sets.subscribe(self.wake)
        pods.subscribe(self.wake)

    async def reconcile(self) -> None:
        if not (self.sets.synced.is_set() and self.pods.synced.is_set()):
            return
        for lws in self.sets.items():
            if not lws["metadata"].get("deletionTimestamp"):
                await self._reconcile_one(lws)

    async def _reconcile_one(self, lws: dict) -> None:
        meta, spec = lws["metadata"], lws.get("spec") or {}
        uid = meta["uid"]
        owned = [p for p in self.pods.items() if p["metadata"]["namespace"] == meta["namespace"] and owned_by(p, uid)]
        names = {p["metadata"]["name"] for p in owned}
        now = time.monotonic()
        created = self.created.setdefault(uid, {})
        for name, since in list(created.items()):
            if name in names or now - since > EXPECTATION_TIMEOUT_SECONDS:
                del created[name]
        if created:
            return  # wait until the cache shows the pods just created
        template = spec.get("leaderWorkerTemplate") or {}
        size = int(template.get("size") or 1)
        ready_groups = 0
        for group in range(int(spec.get("replicas", 1))):
            members = [p for p in owned if _labels(p).get(GROUP_INDEX_LABEL) == str(group)]
            healthy = [p for p in members if not _gone_or_failed(p)]
            if len(healthy) == size:
                ready_groups += all(pod_is_ready(p) for p in healthy)
                continue
            if healthy and len(healthy) < size:
                # RecreateGroupOnPodRestart: a pod of the group went; the group goes with it.
                for pod in healthy:
                    await self._delete(pod)
                log.info(
                    "leaderworkerset %s/%s: group %d lost a pod; recreating it", meta["namespace"], meta["name"], group
                )
                continue
            alive = [p for p in members if not p["metadata"].get("deletionTimestamp")]
            for pod in alive:  # failed pods of a broken group
                await self._delete(pod)
            if members:
                continue  # create the group again once its old pods are gone (the names are reused)
            for worker in range(size):
                await self._create(lws, group, worker, size)
        await self._write_status(lws, ready_groups)

    async def _create(self, lws: dict, group: int, worker: int, size: int) -> None:
        meta = lws["metadata"]
        pod = group_pod(lws, group, worker, size)
        try:
            await self.client.create(collection_path("v1", "pods", meta["namespace"]), pod)
        except KubeError as error:
            if error.status != 409:
                raise
            return
        self.created[meta["uid"]][pod["metadata"]["name"]] = time.monotonic()
        log.info("leaderworkerset %s/%s: created pod %s", meta["namespace"], meta["name"], pod["metadata"]["name"])

    async def _delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            await self.client.delete(object_path("v1", "pods", meta["name"], meta["namespace"]))
        except KubeError as error:
            if error.status != 404:
                raise

    async def _write_status(self, lws: dict, ready_groups: int) -> None:
        meta = lws["metadata"]
        status = {"replicas": int((lws.get("spec") or {}).get("replicas", 1)), "readyReplicas": ready_groups}
        old = lws.get("status") or {}
        if all(old.get(k) == v for k, v in status.items()):
            return
        try:
            await self.client.patch(
                object_path(API_VERSION, PLURAL, meta["name"], meta["namespace"], "status"), {"status": status}
            )
        except KubeError as error:
            if error.status != 404:
                raise
