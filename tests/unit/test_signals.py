"""Each interruption signal a Node can carry → the action and deadline."""

from __future__ import annotations

import datetime
import json

import pytest

from spotrag_operator.signals import Action, node_signal, node_signals

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
ADDED = "2026-11-21T11:59:50Z"


def node(taints=(), annotations=None, unschedulable=False):
    return {"metadata": {"name": "gpu-1", "annotations": annotations or {}}, "spec": {"taints": list(taints), "unschedulable": unschedulable}}


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
    ("AWS NTH spot ITN", node([taint("aws-node-termination-handler/spot-itn", "true")]), "aws-node-termination-handler", "spot-interruption", Action.DRAIN, at(110)),
    ("AWS NTH rebalance", node([taint("aws-node-termination-handler/rebalance-recommendation")]), "aws-node-termination-handler", "rebalance-recommendation", Action.PREWARM, None),
    ("AWS NTH ASG termination", node([taint("aws-node-termination-handler/asg-lifecycle-termination")]), "aws-node-termination-handler", "asg-termination", Action.DRAIN, at(110)),
    ("AWS NTH maintenance", node([taint("aws-node-termination-handler/scheduled-maintenance")]), "aws-node-termination-handler", "scheduled-maintenance", Action.DRAIN, None),
    ("Karpenter disrupted", node([taint("karpenter.sh/disrupted")]), "karpenter", "disrupted", Action.DRAIN, at(110)),
    ("GKE impending termination", node([taint("cloud.google.com/impending-node-termination", "true", "NoSchedule", None)]), "gke", "impending-termination", Action.DRAIN, at(30)),
    ("cluster-autoscaler scale-down", node([taint("ToBeDeletedByClusterAutoscaler", "1700000000", "NoSchedule", None)]), "cluster-autoscaler", "scale-down", Action.DRAIN, None),
    ("cordon", node(unschedulable=True), "kubernetes", "cordon", Action.DRAIN, None),
    ("out of service", node([taint("node.kubernetes.io/out-of-service", "nodeshutdown", "NoExecute", None)]), "kubernetes", "out-of-service", Action.DRAIN, NOW),
    ("node agent AWS", node(annotations=agent_mark(kind="interruption", cloud="aws", deadline="2026-11-21T12:02:00Z", detected="2026-11-21T12:00:00Z")), "node-agent (aws)", "interruption", Action.DRAIN, at(120)),
    ("node agent GCE without time", node(annotations=agent_mark(kind="interruption", cloud="gcp", detected="2026-11-21T12:00:00Z")), "node-agent (gcp)", "interruption", Action.DRAIN, at(30)),
    ("node agent rebalance", node(annotations=agent_mark(kind="rebalance", cloud="aws")), "node-agent (aws)", "rebalance", Action.PREWARM, None),
]


@pytest.mark.parametrize("what, body, source, kind, action, deadline", TABLE, ids=[row[0] for row in TABLE])
def test_signal_table(what, body, source, kind, action, deadline):
    signal = node_signal(body, NOW)
    assert (signal.source, signal.kind, signal.action, signal.deadline) == (source, kind, action, deadline)
    assert signal.warning is None


@pytest.mark.parametrize(
    "body",
    [node(), node([taint("DeletionCandidateOfClusterAutoscaler", effect="PreferNoSchedule")]), node([taint("nvidia.com/gpu", "present")]), node([taint("cloud.google.com/gke-spot", "true")])],
    ids=["plain", "deletion candidate", "gpu taint", "gke spot pool"],
)
def test_ordinary_taints_are_no_signal(body):
    assert node_signal(body, NOW) is None


def test_unparseable_time_is_now_with_a_warning():
    signal = node_signal(node(annotations=agent_mark(kind="interruption", deadline="soon-ish")), NOW)
    assert signal.action is Action.DRAIN and signal.deadline == NOW
    assert "unparseable time 'soon-ish'" in signal.warning


def test_most_urgent_signal_wins():
    body = node([taint("aws-node-termination-handler/rebalance-recommendation"), taint("karpenter.sh/disrupted")], unschedulable=True)
    signals = node_signals(body, NOW)
    assert [s.kind for s in signals] == ["disrupted", "cordon", "rebalance-recommendation"]
    assert node_signal(body, NOW).kind == "disrupted"
