"""Each interruption signal a Node can carry → the action and deadline."""

from __future__ import annotations

import datetime
import json

import pytest

from spotrag_operator.signals import Action, node_signal, node_signals

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
ADDED = "2026-11-21T11:59:50Z"


def node(taints=(), annotations=None, unschedulable=False):
    return {
        "metadata": {"name": "gpu-1", "annotations": annotations or {}},
        "spec": {"taints": list(taints), "unschedulable": unschedulable},
    }


def taint(key, value="", effect="NoSchedule", added=ADDED):
    result = {"key": key, "effect": effect}
    if value:
        result["value"] = value
    if added:
        result["timeAdded"] = added
    return result


def at(seconds):
    return NOW + datetime.timedelta(seconds=seconds)


def agent_mark(**fields):
    return {"spotrag.io/interruption": json.dumps(fields)}


TABLE = [
    # (what, node, source, kind, action, deadline)
    (
        "AWS NTH spot ITN",
        node([taint("aws-node-termination-handler/spot-itn", "true")]),
        "aws-node-termination-handler",
        "spot-interruption",
        Action.DRAIN,
        at(110),
    ),
    (
        "AWS NTH rebalance",
        node([taint("aws-node-termination-handler/rebalance-recommendation")]),
        "aws-node-termination-handler",
        "rebalance-recommendation",
        Action.PREWARM,
        None,
    ),
    (
        "AWS NTH ASG termination",
        node([taint("aws-node-termination-handler/asg-lifecycle-termination")]),
        "aws-node-termination-handler",
        "asg-termination",
        Action.DRAIN,
        at(110),
    ),
    (
        "AWS NTH maintenance",
        node([taint("aws-node-termination-handler/scheduled-maintenance")]),
        "aws-node-termination-handler",
        "scheduled-maintenance",
        Action.DRAIN,
        None,
    ),
    ("Karpenter disrupted", node([taint("karpenter.sh/disrupted")]), "karpenter", "disrupted", Action.DRAIN, at(110)),
    (
        "GKE impending termination",
        node([taint("cloud.google.com/impending-node-termination", "true", "NoSchedule", None)]),
        "gke",
        "impending-termination",
        Action.DRAIN,
        at(30),
    ),
    (
        "cluster-autoscaler scale-down",
        node([taint("ToBeDeletedByClusterAutoscaler", "1700000000", "NoSchedule", None)]),
        "cluster-autoscaler",
        "scale-down",
        Action.DRAIN,
        None,
    ),
    ("cordon", node(unschedulable=True), "kubernetes", "cordon", Action.DRAIN, None),
    (
        "out of service",
        node([taint("node.kubernetes.io/out-of-service", "nodeshutdown", "NoExecute", None)]),
        "kubernetes",
        "out-of-service",
        Action.DRAIN,
        NOW,
    ),
    (
        "node agent AWS",
        node(
            annotations=agent_mark(
                kind="interruption", cloud="aws", deadline="2026-11-21T12:02:00Z", detected="2026-11-21T12:00:00Z"
            )
        ),
        "node-agent (aws)",
        "interruption",
        Action.DRAIN,
        at(120),
    ),
    (
        "node agent GCE",
        node(
            annotations=agent_mark(
                kind="interruption", cloud="gcp", deadline="2026-11-21T12:00:30Z", detected="2026-11-21T12:00:00Z"
            )
        ),
        "node-agent (gcp)",
        "interruption",
        Action.DRAIN,
        at(30),
    ),
    (
        "node agent Azure maintenance",
        node(
            annotations=agent_mark(
                kind="maintenance", cloud="azure", deadline="2026-11-21T12:05:00Z", detected="2026-11-21T12:00:00Z"
            )
        ),
        "node-agent (azure)",
        "maintenance",
        Action.DRAIN,
        at(300),
    ),
    (
        "node agent rebalance",
        node(
            annotations=agent_mark(
                kind="rebalance", cloud="aws", deadline="2026-11-21T12:02:00Z", detected="2026-11-21T12:00:00Z"
            )
        ),
        "node-agent (aws)",
        "rebalance",
        Action.PREWARM,
        None,
    ),
]


@pytest.mark.parametrize("what, body, source, kind, action, deadline", TABLE, ids=[row[0] for row in TABLE])
def test_signal_table(what, body, source, kind, action, deadline):
    signal = node_signal(body, NOW)
    assert (signal.source, signal.kind, signal.action, signal.deadline) == (source, kind, action, deadline)
    assert signal.warning is None


@pytest.mark.parametrize(
    "body",
    [
        node(),
        node([taint("DeletionCandidateOfClusterAutoscaler", effect="PreferNoSchedule")]),
        node([taint("nvidia.com/gpu", "present")]),
        node([taint("cloud.google.com/gke-spot", "true")]),
    ],
    ids=["plain", "deletion candidate", "gpu taint", "gke spot pool"],
)
def test_ordinary_taints_are_no_signal(body):
    assert node_signal(body, NOW) is None


def test_unparseable_time_is_now_with_a_warning():
    signal = node_signal(
        node(
            annotations=agent_mark(
                kind="interruption", cloud="aws", deadline="soon-ish", detected="2026-11-21T12:00:00Z"
            )
        ),
        NOW,
    )
    assert signal.action is Action.DRAIN and signal.deadline == NOW
    assert "'soon-ish' is not RFC 3339; treated as now" in signal.warning


def test_unreadable_node_agent_mark_drains_now():
    signal = node_signal(node(annotations={"spotrag.io/interruption": "terminate!"}), NOW)
    assert (signal.action, signal.deadline) == (Action.DRAIN, NOW)
    assert "not JSON" in signal.warning


def test_what_the_node_agent_writes_is_read_back():
    from spotrag_runtime.node_agent.mark import Notice

    notice = Notice(kind="interruption", cloud="aws", deadline=at(120), detected=NOW, ref="i-123")
    signal = node_signal(node([notice.taint()], annotations={"spotrag.io/interruption": notice.to_annotation()}), NOW)
    assert (signal.action, signal.deadline, signal.source) == (Action.DRAIN, at(120), "node-agent (aws)")


def test_most_urgent_signal_wins():
    body = node(
        [taint("aws-node-termination-handler/rebalance-recommendation"), taint("karpenter.sh/disrupted")],
        unschedulable=True,
    )
    signals = node_signals(body, NOW)
    assert [s.kind for s in signals] == ["disrupted", "cordon", "rebalance-recommendation"]
    assert node_signal(body, NOW).kind == "disrupted"
