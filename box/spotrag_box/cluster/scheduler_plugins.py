"""Where a pod may run: the kube-scheduler's filter and score plugins that
matter for GPU inference, as pure functions over plain objects.

Filters (a node must pass all): NodeUnschedulable (cordon), NodeName,
TaintToleration (NoSchedule and NoExecute), NodeAffinity (nodeSelector and
required node affinity: terms ORed, expressions ANDed, In / NotIn / Exists /
DoesNotExist / Gt / Lt), NodeResourcesFit (cpu, memory, pods and extended
resources such as nvidia.com/gpu). Scores: PodTopologySpread for
ScheduleAnyway constraints (fewer matching pods in the domain is better),
then LeastAllocated. When no node fits, the reason reads like the real
scheduler's: "0/8 nodes are available: 4 Insufficient nvidia.com/gpu, ...".
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from kubernetes.utils.quantity import parse_quantity

DEFAULT_MAX_PODS = 110


def tolerates(tolerations: Iterable[Mapping], taint: Mapping) -> bool:
    """ToleratesTaint from k8s.io/api/core/v1/toleration.go."""
    for toleration in tolerations:
        effect = toleration.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        key = toleration.get("key") or ""
        operator = toleration.get("operator") or "Equal"
        if not key:
            # An empty key with Exists tolerates everything.
            if operator == "Exists":
                return True
            continue
        if key != taint.get("key"):
            continue
        if operator == "Exists":
            return True
        if operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def untolerated_taint(pod: Mapping, node: Mapping) -> dict | None:
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return dict(taint)
    return None


def expression_matches(expression: Mapping, labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values") or []
    present = key in labels
    match operator:
        case "In":
            return present and labels[key] in values
        case "NotIn":
            return not present or labels[key] not in values
        case "Exists":
            return present
        case "DoesNotExist":
            return not present
        case "Gt" | "Lt":
            if not present or len(values) != 1:
                return False
            try:
                have, limit = int(labels[key]), int(values[0])
            except ValueError:
                return False
            return have > limit if operator == "Gt" else have < limit
    raise ValueError(f"unknown node selector operator {operator!r}")


def term_matches(term: Mapping, node: Mapping) -> bool:
    """One nodeSelectorTerm: every expression must hold. matchFields
    supports metadata.name, the only field Kubernetes allows there."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    fields = {"metadata.name": node["metadata"]["name"]}
    expressions = term.get("matchExpressions") or []
    field_expressions = term.get("matchFields") or []
    if not expressions and not field_expressions:
        return False  # an empty term matches no objects (as in Kubernetes)
    return all(expression_matches(e, labels) for e in expressions) and all(
        expression_matches(e, fields) for e in field_expressions
    )


def affinity_matches(pod: Mapping, node: Mapping) -> bool:
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if terms is None:
        return True
    return any(term_matches(term, node) for term in terms)


def pod_requests(pod: Mapping) -> dict[str, Decimal]:
    """Effective requests: the sum over containers, or the largest init
    container, whichever is more; limits stand in for missing requests of
    extended resources (as Kubernetes defaults them)."""
    spec = pod.get("spec") or {}

    def of(container: Mapping) -> dict[str, Decimal]:
        resources = container.get("resources") or {}
        merged = dict(resources.get("limits") or {}) | dict(resources.get("requests") or {})
        return {name: parse_quantity(value) for name, value in merged.items()}

    total: dict[str, Decimal] = collections.defaultdict(Decimal)
    for container in spec.get("containers") or []:
        for name, value in of(container).items():
            total[name] += value
    for container in spec.get("initContainers") or []:
        for name, value in of(container).items():
            total[name] = max(total[name], value)
    return dict(total)


def node_allocatable(node: Mapping) -> dict[str, Decimal]:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return {name: parse_quantity(value) for name, value in allocatable.items()}


def pod_is_active(pod: Mapping) -> bool:
    """Holds node resources: bound and not finished."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


@dataclass(frozen=True)
class NodeUse:
    requested: dict[str, Decimal]
    pods: int


def node_use(pods_on_node: Iterable[Mapping]) -> NodeUse:
    requested: dict[str, Decimal] = collections.defaultdict(Decimal)
    count = 0
    for pod in pods_on_node:
        if not pod_is_active(pod):
            continue
        count += 1
        for name, value in pod_requests(pod).items():
            requested[name] += value
    return NodeUse(dict(requested), count)


def insufficient(pod: Mapping, node: Mapping, use: NodeUse) -> list[str]:
    """The resources the node lacks for the pod, sorted."""
    allocatable = node_allocatable(node)
    missing = []
    if use.pods + 1 > allocatable.get("pods", Decimal(DEFAULT_MAX_PODS)):
        missing.append("pods")
    for name, wanted in pod_requests(pod).items():
        if wanted <= 0:
            continue
        if use.requested.get(name, Decimal(0)) + wanted > allocatable.get(name, Decimal(0)):
            missing.append(name)
    return sorted(missing)


def node_ready(node: Mapping) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def filter_node(pod: Mapping, node: Mapping, use: NodeUse) -> str | None:
    """None if the pod fits the node, else the reason as the scheduler words it."""
    if not node_ready(node):
        return "node(s) were not ready"
    if (node.get("spec") or {}).get("unschedulable"):
        return "node(s) were unschedulable"
    if (taint := untolerated_taint(pod, node)) is not None:
        return f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value') or ''}}}"
    if not affinity_matches(pod, node):
        return "node(s) didn't match Pod's node affinity/selector"
    if missing := insufficient(pod, node, use):
        return ", ".join(f"Insufficient {name}" for name in missing)
    return None


def _selector_matches(selector: Mapping, labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        if not expression_matches(expression, labels):
            return False
    return True


def spread_penalty(
    pod: Mapping, node: Mapping, nodes: Iterable[Mapping], pods_by_node: Mapping[str, list[Mapping]]
) -> int:
    """Pods matching each topology spread constraint already in this node's
    domain; lower spreads better. DoNotSchedule constraints are treated as
    preferences too (the operator renders only ScheduleAnyway)."""
    penalty = 0
    node_labels = node["metadata"].get("labels") or {}
    namespace = pod["metadata"].get("namespace")
    for constraint in (pod.get("spec") or {}).get("topologySpreadConstraints") or []:
        key = constraint["topologyKey"]
        if key not in node_labels:
            continue
        domain = node_labels[key]
        for other in nodes:
            if (other["metadata"].get("labels") or {}).get(key) != domain:
                continue
            for placed in pods_by_node.get(other["metadata"]["name"], []):
                if (
                    placed["metadata"].get("namespace") == namespace
                    and pod_is_active(placed)
                    and _selector_matches(constraint.get("labelSelector") or {}, placed["metadata"].get("labels") or {})
                ):
                    penalty += 1
    return penalty


def allocated_share(node: Mapping, use: NodeUse) -> float:
    allocatable = node_allocatable(node)
    shares = [
        float(use.requested.get(name, 0) / allocatable[name]) for name in ("cpu", "memory") if allocatable.get(name)
    ]
    return sum(shares) / len(shares) if shares else 0.0


@dataclass(frozen=True)
class Decision:
    node: str | None  # the chosen node, or None: unschedulable
    message: str = ""  # why nothing fits, as the scheduler says it


def schedule(pod: Mapping, nodes: list[Mapping], pods_by_node: Mapping[str, list[Mapping]]) -> Decision:
    if not nodes:
        return Decision(None, "no nodes available to schedule pods")
    feasible = []
    reasons: collections.Counter[str] = collections.Counter()
    for node in nodes:
        use = node_use(pods_by_node.get(node["metadata"]["name"], []))
        if (reason := filter_node(pod, node, use)) is None:
            feasible.append((node, use))
        else:
            for part in reason.split(", "):
                reasons[part] += 1
    if not feasible:
        # Sorted as the whole "N reason" strings, as kube-scheduler sorts them.
        detail = ", ".join(sorted(f"{count} {reason}" for reason, count in reasons.items()))
        return Decision(None, f"0/{len(nodes)} nodes are available: {detail}.")
    best, _ = min(
        feasible,
        key=lambda pair: (
            spread_penalty(pod, pair[0], nodes, pods_by_node),
            allocated_share(pair[0], pair[1]),
            pair[0]["metadata"]["name"],
        ),
    )
    return Decision(best["metadata"]["name"])
