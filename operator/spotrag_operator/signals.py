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
from dataclasses import dataclass

from spotrag_runtime.node_agent.mark import ANNOTATION as NODE_AGENT_ANNOTATION
from spotrag_runtime.node_agent.mark import InvalidNodeMark, parse_node_mark


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
    "aws-node-termination-handler/spot-itn": Rule(
        "aws-node-termination-handler", "spot-interruption", Action.DRAIN, 120
    ),
    "aws-node-termination-handler/asg-lifecycle-termination": Rule(
        "aws-node-termination-handler", "asg-termination", Action.DRAIN, 120
    ),
    "aws-node-termination-handler/scheduled-maintenance": Rule(
        "aws-node-termination-handler", "scheduled-maintenance", Action.DRAIN, None
    ),
    "aws-node-termination-handler/rebalance-recommendation": Rule(
        "aws-node-termination-handler", "rebalance-recommendation", Action.PREWARM, None
    ),
    "karpenter.sh/disrupted": Rule("karpenter", "disrupted", Action.DRAIN, 120),
    "cloud.google.com/impending-node-termination": Rule("gke", "impending-termination", Action.DRAIN, 30),
    "ToBeDeletedByClusterAutoscaler": Rule("cluster-autoscaler", "scale-down", Action.DRAIN, None),
    "DeletionCandidateOfClusterAutoscaler": Rule("cluster-autoscaler", "deletion-candidate", Action.NONE, None),
    "node.kubernetes.io/out-of-service": Rule("kubernetes", "out-of-service", Action.DRAIN, 0),
    "node.kubernetes.io/unschedulable": Rule("kubernetes", "cordon", Action.DRAIN, None),
}

CORDON = Rule("kubernetes", "cordon", Action.DRAIN, None)
# The node agent's mark (runtime/spotrag_runtime/node_agent/mark.py) always
# carries its deadline; only the action is decided here.
NODE_AGENT_ACTIONS: dict[str, Action] = {
    "interruption": Action.DRAIN,
    "maintenance": Action.DRAIN,
    "rebalance": Action.PREWARM,
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
    if NODE_AGENT_ANNOTATION in annotations and (agent := _node_agent_signal(name, annotations, now)) is not None:
        found.append(agent)
    return sorted(found, key=_urgency)


def _node_agent_signal(name: str, annotations: dict, now: datetime.datetime) -> NodeSignal | None:
    try:
        notice = parse_node_mark(annotations, now=now)
    except InvalidNodeMark as error:
        # A mark that cannot be read still says the node is going: drain now.
        return NodeSignal(
            name, "node-agent", "interruption", Action.DRAIN, now, f"{error}; treated as an interruption now"
        )
    if notice is None:
        return None
    action = NODE_AGENT_ACTIONS[notice.kind]
    deadline = notice.deadline if action is Action.DRAIN else None
    return NodeSignal(name, f"node-agent ({notice.cloud})", notice.kind, action, deadline, notice.warning)


def node_signal(node: dict, now: datetime.datetime) -> NodeSignal | None:
    """The one signal that decides what happens to the node's engines."""
    signals = node_signals(node, now)
    return signals[0] if signals else None
