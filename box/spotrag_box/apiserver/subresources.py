"""The subresources of the API stand-in beyond status: /scale, pods' /eviction (with PodDisruptionBudgets), /binding."""

import copy
import math
from collections.abc import Mapping
from typing import Any

from spotrag_box.apiserver import selectors as kube_selectors
from spotrag_box.apiserver.deletion import Deletions
from spotrag_box.apiserver.errors import ApiError, conflict
from spotrag_box.apiserver.registry import PDBS, PODS, Registry, Served
from spotrag_box.apiserver.store import Store
from spotrag_box.apiserver.writes import Writes


class Subresources:
    def __init__(self, registry: Registry, store: Store, writes: Writes, deletions: Deletions) -> None:
        self.registry, self.store, self.writes, self.deletions = registry, store, writes, deletions

    def scale_of(self, served: Served, obj: Mapping[str, Any]) -> dict[str, Any]:
        paths = served.scale_paths()
        assert paths is not None
        spec_path, status_path, selector_path = paths
        if selector_path:
            selector = _get_path(obj, selector_path) or ""
        else:
            selector = kube_selectors.format_label_selector((obj.get("spec") or {}).get("selector") or {})
        metadata = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                key: metadata[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in metadata
            },
            "spec": {"replicas": _get_path(obj, spec_path) or 0},
            "status": {"replicas": _get_path(obj, status_path) or 0, "selector": selector},
        }

    def write_scale(self, served: Served, namespace: str | None, name: str, scale: Any) -> dict[str, Any]:
        if not isinstance(scale, Mapping) or not isinstance((scale.get("spec") or {}).get("replicas"), int):
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Required value',
                {
                    "name": name,
                    "group": "autoscaling",
                    "kind": "Scale",
                    "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.replicas"}],
                },
            )
        replicas = scale["spec"]["replicas"]
        if replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                f"{replicas}: must be greater than or equal to 0",
            )
        current = self.writes.existing(served, namespace, name)
        expected_version = (scale.get("metadata") or {}).get("resourceVersion")
        if expected_version not in (None, "", current["metadata"]["resourceVersion"]):
            raise conflict(served, name)
        paths = served.scale_paths()
        assert paths is not None
        new = copy.deepcopy(current)
        _set_path(new, paths[0], replicas)
        updated, _ = self.writes.update(served, namespace, name, new)
        return self.scale_of(served, updated)

    def evict(self, namespace: str, name: str, eviction: Any) -> None:
        """policy/v1 Eviction: refuse (429) what a PodDisruptionBudget forbids, else delete the pod."""
        pods = self.registry.served(PODS)
        pod = self.writes.existing(pods, namespace, name)
        if not pod["metadata"].get("deletionTimestamp") and _is_ready(pod):
            for budget in self.store.select(self.registry.served(PDBS), namespace, (), ()):
                violation = self._budget_violation(budget, pod)
                if violation:
                    raise ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                        {"causes": [{"reason": "DisruptionBudget", "message": violation}]},
                    )
        options = (eviction or {}).get("deleteOptions") if isinstance(eviction, Mapping) else None
        self.deletions.delete(pods, namespace, name, options or {})

    def _budget_violation(self, budget: Mapping[str, Any], pod: Mapping[str, Any]) -> str | None:
        spec = budget.get("spec") or {}
        selector = kube_selectors.parse_label_selector(kube_selectors.format_label_selector(spec.get("selector") or {}))
        if not spec.get("selector") or not kube_selectors.labels_match(selector, pod):
            return None
        covered = [
            p
            for p in self.store.select(self.registry.served(PODS), budget["metadata"]["namespace"], selector, ())
            if not p["metadata"].get("deletionTimestamp")
        ]
        healthy = sum(1 for p in covered if _is_ready(p))
        expected = len(covered)

        def count(value: Any) -> int:
            if isinstance(value, str) and value.endswith("%"):
                return math.ceil(int(value[:-1]) * expected / 100)
            return int(value)

        if spec.get("minAvailable") is not None:
            desired = count(spec["minAvailable"])
        elif spec.get("maxUnavailable") is not None:
            desired = expected - count(spec["maxUnavailable"])
        else:
            return None
        if healthy - 1 >= desired:
            return None
        return f"The disruption budget {budget['metadata']['name']} needs {desired} healthy pods and has {healthy} currently"

    def bind(self, namespace: str, binding: Any, pod_name: str | None = None) -> None:
        """core/v1 Binding, as a scheduler posts it: set the pod's spec.nodeName once."""
        if not isinstance(binding, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a Binding object")
        name = pod_name or (binding.get("metadata") or {}).get("name")
        node = (binding.get("target") or {}).get("name")
        if not name or not node:
            raise ApiError(400, "BadRequest", "a Binding needs metadata.name and target.name")
        pods = self.registry.served(PODS)
        pod = self.writes.existing(pods, namespace, name)
        if pod.get("spec", {}).get("nodeName"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{name}": '
                f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        new = copy.deepcopy(pod)
        new.setdefault("spec", {})["nodeName"] = node
        self.writes.update(pods, namespace, name, new)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.strip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
