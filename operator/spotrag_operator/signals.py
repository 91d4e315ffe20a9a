"""Interruption signals a Node carries, and what the operator does about them.

Clusters already announce that a node is going: AWS Node Termination Handler,
Karpenter, GKE and cluster-autoscaler taint it, a person cordons it, and
spotrag's node agent marks it with the cloud's own deadline. Each rule below
recognises one of those marks and says what it means; `node_signal` reduces a
Node to the most urgent one. Unknown taints are not signals (no action), as
in Karpenter's interruption controller.

Sources: ../shared/notes/interruption-signals.md (AWS NTH pkg/node/node.go,
karpenter-provider-aws interruption controller, GKE and AKS docs).
"""

from __future__ import annotations

import datetime
import enum
import json
from dataclasses import dataclass

NODE_AGENT_ANNOTATION = "spotrag.io/interruption"
NODE_AGENT_TAINT = "spotrag.io/interruption"


class Action(enum.Enum):
    DRAIN = "drain"  # take the node's engines out of serving now, replace them
    PREWARM = "prewarm"  # start replacements, keep the engines serving
    NONE = "none"


@dataclass(frozen=True)
class Rule:
    source: str
    kind: str
    action: Action
    notice_seconds: float | None  # the default deadline when the signal carries no time; None: no deadline


# Taint key → what it means. One readable table; order does not matter.
TAINT_RULES: dict[str, Rule] = {
    "aws-node-termination-handler/spot-itn": Rule("aws-node-termination-handler", "spot-interruption", Action.DRAIN, 120),
    "aws-node-termination-handler/asg-lifecycle-termination": Rule("aws-node-termination-handler", "asg-termination", Action.DRAIN, 120),
    "aws-node-termination-handler/scheduled-maintenance": Rule("aws-node-termination-handler", "scheduled-maintenance", Action.DRAIN, None),
    "aws-node-termination-handler/rebalance-recommendation": Rule("aws-node-termination-handler", "rebalance-recommendation", Action.PREWARM, None),
    "karpenter.sh/disrupted": Rule("karpenter", "disrupted", Action.DRAIN, 120),
    "cloud.google.com/impending-node-termination": Rule("gke", "impending-termination", Action.DRAIN, 30),
    "ToBeDeletedByClusterAutoscaler": Rule("cluster-autoscaler", "scale-down", Action.DRAIN, None),
    "DeletionCandidateOfClusterAutoscaler": Rule("cluster-autoscaler", "deletion-candidate", Action.NONE, None),
    "node.kubernetes.io/out-of-service": Rule("kubernetes", "out-of-service", Action.DRAIN, 0),
    "node.kubernetes.io/unschedulable": Rule("kubernetes", "cordon", Action.DRAIN, None),
}

CORDON = Rule("kubernetes", "cordon", Action.DRAIN, None)
NODE_AGENT_RULES: dict[str, Rule] = {
    "interruption": Rule("node-agent", "interruption", Action.DRAIN, 30),
    "maintenance": Rule("node-agent", "maintenance", Action.DRAIN, 60),
    "rebalance": Rule("node-agent", "rebalance", Action.PREWARM, None),
}


@dataclass(frozen=True)
class NodeSignal:
    node: str
    source: str
    kind: str
    action: Action
    deadline: datetime.datetime | None  # when the node is expected gone; None: no deadline
    warning: str | None = None  # e.g. an unparseable time, treated as "now"

    def describe(self) -> str:
        when = f", deadline {self.deadline.strftime('%H:%M:%SZ')}" if self.deadline else ""
        return f"{self.source} {self.kind} on node {self.node}{when}"


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _deadline(rule: Rule, stated: str | None, now: datetime.datetime) -> tuple[datetime.datetime | None, str | None]:
    """The signal's own time when it has one; a bad time counts as now."""
    if stated:
        parsed = _parse_time(stated)
        if parsed is None:
            return now, f"{rule.source}: unparseable time {stated!r}, treated as now"
        return parsed, None
    if rule.notice_seconds is None:
        return None, None
    return now + datetime.timedelta(seconds=rule.notice_seconds), None


def _urgency(signal: NodeSignal) -> tuple:
    rank = {Action.DRAIN: 0, Action.PREWARM: 1, Action.NONE: 2}[signal.action]
    deadline = signal.deadline.timestamp() if signal.deadline else float("inf")
    return (rank, deadline)


def node_signals(node: dict, now: datetime.datetime) -> list[NodeSignal]:
    """Every signal this Node carries, most urgent first."""
    name = node["metadata"]["name"]
    annotations = node["metadata"].get("annotations") or {}
    spec = node.get("spec") or {}
    found: list[NodeSignal] = []
    for taint in spec.get("taints") or []:
        rule = TAINT_RULES.get(taint.get("key", ""))
        if rule is None or rule.action is Action.NONE:
            continue
        # A taint's timeAdded is when the signal arrived; the notice runs from then.
        added = _parse_time(taint.get("timeAdded")) or now
        deadline, warning = _deadline(rule, None, added)
        found.append(NodeSignal(name, rule.source, rule.kind, rule.action, deadline, warning))
    if spec.get("unschedulable"):
        found.append(NodeSignal(name, CORDON.source, CORDON.kind, CORDON.action, None))
    if mark := annotations.get(NODE_AGENT_ANNOTATION):
        found.append(_node_agent_signal(name, mark, now))
    return sorted(found, key=_urgency)


def _node_agent_signal(name: str, mark: str, now: datetime.datetime) -> NodeSignal:
    try:
        data = json.loads(mark)
    except json.JSONDecodeError:
        data = {"kind": "interruption", "deadline": mark}
    rule = NODE_AGENT_RULES.get(str(data.get("kind")), NODE_AGENT_RULES["interruption"])
    detected = _parse_time(data.get("detected")) or now
    deadline, warning = _deadline(rule, data.get("deadline"), detected)
    source = f"node-agent ({data['cloud']})" if data.get("cloud") else rule.source
    return NodeSignal(name, source, rule.kind, rule.action, deadline, warning)


def node_signal(node: dict, now: datetime.datetime) -> NodeSignal | None:
    """The one signal that decides what happens to the node's engines."""
    signals = node_signals(node, now)
    return signals[0] if signals else None
