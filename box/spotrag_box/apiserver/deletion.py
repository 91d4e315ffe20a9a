"""DELETE in the API stand-in: preconditions, the three propagation policies, finalizers and grace periods.

A deleted object first gets a deletionTimestamp; it leaves once no finalizer
and no grace period holds it (``writes.ready_to_go``). Pods on a node stay
Terminating until their kubelet deletes them again with grace 0. Foreground
deletion and CRD cleanup add server-owned finalizers that the garbage
collector (``collector.py``) lifts once their work is done.
"""

import copy
import datetime
import json
from collections.abc import Mapping
from typing import Any

from spotrag_box.apiserver.errors import ApiError, conflict
from spotrag_box.apiserver.registry import CRDS, NAMESPACES, PODS, Registry, Served
from spotrag_box.apiserver.store import Store
from spotrag_box.apiserver.writes import Writes, ready_to_go

DEFAULT_POD_GRACE_SECONDS = 30
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
FOREGROUND_FINALIZER = "foregroundDeletion"
_POLICIES = ("Orphan", "Background", "Foreground")


class Deletions:
    def __init__(self, registry: Registry, store: Store, writes: Writes, *, graceful_pod_deletion: bool = True) -> None:
        self.registry, self.store, self.writes = registry, store, writes
        self.graceful_pod_deletion = graceful_pod_deletion

    def delete(
        self,
        served: Served,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """DELETE: finalizers block, graceful pods wait for their kubelet, dependents follow the owner."""
        options = options or {}
        current = self.writes.existing(served, namespace, name)
        _check_preconditions(served, name, current, options.get("preconditions") or {})
        if dry_run:
            return current
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if policy not in _POLICIES:
            raise ApiError(
                400,
                "BadRequest",
                f"propagationPolicy: Unsupported value: {json.dumps(policy)}: "
                f'supported values: "Foreground", "Background", "Orphan"',
            )
        if policy == "Orphan":
            self.orphan_dependents(current["metadata"]["uid"])
        new = copy.deepcopy(current)
        self._add_server_finalizers(served, new, policy)
        if served.storage == NAMESPACES:
            new.setdefault("status", {})["phase"] = "Terminating"
        grace = self._grace_seconds(served, current, options)
        metadata = new["metadata"]
        if metadata.get("deletionTimestamp"):
            if grace is not None and grace < (metadata.get("deletionGracePeriodSeconds") or 0):
                metadata["deletionGracePeriodSeconds"] = grace  # a shorter grace period, e.g. the kubelet's 0
            elif new == current:
                return current
        else:
            metadata["deletionTimestamp"] = (
                datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=grace or 0)
            ).strftime("%Y-%m-%dT%H:%M:%SZ")
            metadata["deletionGracePeriodSeconds"] = grace or 0
            metadata["generation"] = metadata.get("generation", 1) + 1
        metadata["resourceVersion"] = self.store.next_resource_version()
        if ready_to_go(self.store, served, new):
            self.store.commit(served, "DELETED", new, current)
        else:
            self.store.commit(served, "MODIFIED", new, current)
            self.store.on_delete()
        return new

    def orphan_dependents(self, uid: str) -> None:
        for key, obj in self.store.live():
            references = obj["metadata"].get("ownerReferences") or []
            if any(reference.get("uid") == uid for reference in references):
                remaining = [reference for reference in references if reference.get("uid") != uid]
                self.writes.update(
                    self.registry.served_for_storage(key[0]),
                    key[1],
                    key[2],
                    {**obj, "metadata": {**obj["metadata"], "ownerReferences": remaining}},
                )

    def _add_server_finalizers(self, served: Served, obj: dict[str, Any], policy: str) -> None:
        """Foreground deletion waits for dependents; a CRD waits for its custom resources."""
        metadata = obj["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        if (
            policy == "Foreground"
            and FOREGROUND_FINALIZER not in finalizers
            and self.store.has_dependents(metadata["uid"])
        ):
            finalizers.append(FOREGROUND_FINALIZER)
        if served.storage == CRDS and CRD_CLEANUP_FINALIZER not in finalizers:
            finalizers.append(CRD_CLEANUP_FINALIZER)
        if finalizers:
            metadata["finalizers"] = finalizers

    def _grace_seconds(self, served: Served, obj: Mapping[str, Any], options: Mapping[str, Any]) -> int | None:
        """Pods on a node get a grace period: they stay Terminating until their kubelet deletes them."""
        requested = options.get("gracePeriodSeconds")
        if served.storage != PODS or not self.graceful_pod_deletion or not obj.get("spec", {}).get("nodeName"):
            return 0 if requested is not None else None
        if requested is not None:
            return max(int(requested), 0)
        return int(obj["spec"].get("terminationGracePeriodSeconds", DEFAULT_POD_GRACE_SECONDS))


def _check_preconditions(
    served: Served, name: str, current: Mapping[str, Any], preconditions: Mapping[str, Any]
) -> None:
    for field in ("uid", "resourceVersion"):
        if preconditions.get(field) not in (None, current["metadata"].get(field)):
            raise conflict(
                served,
                name,
                f"Precondition failed: {field}: {preconditions[field]}, "
                f"{field} in object meta: {current['metadata'].get(field)}",
            )
