"""What kube-controller-manager's garbage collector and namespace controller do, for the API stand-in.

Dependents whose owners are gone are deleted (or lose the dangling reference),
foreground deletion waits for dependents, a deleted namespace is emptied, a
deleted CRD takes its custom resources with it. A pass runs on the event loop
soon after any deletion starts or ends, and repeats while it makes progress.
"""

import asyncio
import copy
import logging
from collections.abc import Callable
from typing import Any

from spotrag_box.apiserver.deletion import CRD_CLEANUP_FINALIZER, FOREGROUND_FINALIZER, Deletions
from spotrag_box.apiserver.errors import ApiError
from spotrag_box.apiserver.registry import NAMESPACES, Registry
from spotrag_box.apiserver.store import Key, Store
from spotrag_box.apiserver.writes import Writes

logger = logging.getLogger(__name__)


class GarbageCollector:
    def __init__(self, registry: Registry, store: Store, writes: Writes, deletions: Deletions) -> None:
        self.registry, self.store, self.writes, self.deletions = registry, store, writes, deletions
        self._scheduled = False

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.collect)

    def collect(self) -> None:
        """One pass, repeated while it changes anything."""
        self._scheduled = False
        progress = True
        while progress:
            progress = False
            live = list(self.store.live())
            by_uid = {obj["metadata"]["uid"]: obj for _, obj in live}
            for key, _ in live:
                progress |= self._step(self._collect_dependent, key, by_uid)
            for key, obj in live:
                if obj["metadata"].get("deletionTimestamp"):
                    progress |= self._step(self._finish_deletion, key)

    def _step(self, step: Callable[..., bool], key: Key, *args: Any) -> bool:
        """One step on the current state of one object; a refused write is logged and left,
        as the real collector leaves what it cannot change (and retries it on the next pass)."""
        current = self.store.current(self.registry.served_for_storage(key[0]), key[1], key[2])
        if current is None:
            return False  # gone earlier in this pass
        try:
            return step(key, current, *args)
        except ApiError as e:
            logger.warning("Garbage collection could not handle %s %s/%s: %s", key[0].plural, key[1], key[2], e)
            return False

    def _collect_dependent(self, key: Key, obj: dict[str, Any], by_uid: dict[str, Any]) -> bool:
        references = obj["metadata"].get("ownerReferences") or []
        if not references or obj["metadata"].get("deletionTimestamp"):
            return False
        owners = [by_uid.get(reference.get("uid")) for reference in references]
        served = self.registry.served_for_storage(key[0])
        name, namespace = obj["metadata"]["name"], obj["metadata"].get("namespace")
        foreground = any(
            owner is not None
            and owner["metadata"].get("deletionTimestamp")
            and FOREGROUND_FINALIZER in (owner["metadata"].get("finalizers") or [])
            for owner in owners
        )
        if all(owner is None for owner in owners) or foreground:
            self.deletions.delete(served, namespace, name, {"propagationPolicy": "Background"})
            return True
        if any(owner is None for owner in owners):
            remaining = [ref for ref, owner in zip(references, owners, strict=False) if owner is not None]
            metadata = {**obj["metadata"], "ownerReferences": remaining}
            self.writes.update(served, namespace, name, {**obj, "metadata": metadata})
            return True
        return False

    def _finish_deletion(self, key: Key, obj: dict[str, Any]) -> bool:
        """Lift the server-owned finalizers once their work is done."""
        served = self.registry.served_for_storage(key[0])
        metadata = obj["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        if served.storage == NAMESPACES:
            return self._empty_namespace(metadata["name"])
        if FOREGROUND_FINALIZER in finalizers and not self.store.has_dependents(metadata["uid"]):
            finalizers.remove(FOREGROUND_FINALIZER)
        if CRD_CLEANUP_FINALIZER in finalizers and self._remove_custom_resources(obj):
            finalizers.remove(CRD_CLEANUP_FINALIZER)
            self.registry.unregister_crd(obj["spec"]["group"], obj["spec"]["names"]["plural"])
        if finalizers == list(metadata.get("finalizers") or []):
            return False
        self.writes.update(
            served,
            metadata.get("namespace"),
            metadata["name"],
            {**obj, "metadata": {**metadata, "finalizers": finalizers}},
        )
        return True

    def _empty_namespace(self, namespace: str) -> bool:
        progress = False
        remaining = False
        for key, obj in self.store.live():
            if key[1] != namespace:
                continue
            remaining = True
            if not obj["metadata"].get("deletionTimestamp"):
                served = self.registry.served_for_storage(key[0])
                self.deletions.delete(served, namespace, key[2], {"gracePeriodSeconds": 0})
                progress = True
        if not remaining:
            served = self.registry.served(NAMESPACES)
            current = self.store.current(served, None, namespace)
            if current is not None and not current["metadata"].get("finalizers"):
                final = copy.deepcopy(current)
                final["metadata"]["resourceVersion"] = self.store.next_resource_version()
                self.store.commit(served, "DELETED", final, current)
                progress = True
        return progress

    def _remove_custom_resources(self, crd: dict[str, Any]) -> bool:
        """Delete the CRD's objects; True once none is left."""
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        for key, obj in self.store.live():
            if (key[0].group, key[0].plural) == (group, plural) and not obj["metadata"].get("deletionTimestamp"):
                self.deletions.delete(self.registry.served_for_storage(key[0]), key[1], key[2])
        return not any((key[0].group, key[0].plural) == (group, plural) for key, _ in self.store.live())
