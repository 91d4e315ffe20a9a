"""Which nodes an engine could run on, judged from the Node objects alone
(pure): the engine's node affinity for its capacity type (every cloud's
label convention, ORed), gpu.nodeSelector, the accelerator taint being the
only one in the way, and enough of the accelerator allocatable. Used to say,
when an engine group stays Pending, which nodes would fit it."""

from __future__ import annotations

from collections.abc import Mapping

from . import render


def _expression_matches(expression: Mapping, labels: Mapping[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
    if operator == "In":
        return labels.get(key) in values
    if operator == "NotIn":
        return labels.get(key) not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    return False


def _allocatable(node: Mapping, resource: str) -> int:
    value = str(((node.get("status") or {}).get("allocatable") or {}).get(resource) or "0")
    return int(value) if value.isdigit() else 0


def node_fits(spec: dict, capacity: str, node: Mapping) -> bool:
    """Whether one pod of an engine of `capacity` could land on `node` if it were empty."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    affinity = render.engine_pod_affinity(spec, capacity)
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    if not any(all(_expression_matches(e, labels) for e in term["matchExpressions"]) for term in terms):
        return False
    if any(labels.get(k) != v for k, v in (spec["gpu"].get("nodeSelector") or {}).items()):
        return False
    return _allocatable(node, spec["gpu"]["resourceName"]) >= render.gpu_count(spec)


def fitting_nodes(spec: dict, capacity: str, nodes: Mapping[str, Mapping]) -> list[str]:
    return sorted(name for name, node in nodes.items() if node_fits(spec, capacity, node))
