"""The engine plan and the drain on constructed histories: exact actions."""

from __future__ import annotations

import datetime

import pytest

from spotrag_operator import render
from spotrag_operator.plan import Drain, DrainTiming, Engine, capacity_split, plan_engines
from spotrag_operator.signals import Action, NodeSignal

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
HASH = "new"
TIMING = DrainTiming(grace=5, timeout=90, margin=10)


def at(seconds: float) -> datetime.datetime:
    return NOW + datetime.timedelta(seconds=seconds)


def engine(
    name,
    capacity=render.SPOT,
    *,
    spec_hash=HASH,
    serving=True,
    ready=True,
    failed=False,
    terminating=False,
    age=600,
    drain_age=None,
    drain_deadline=None,
    node=None,
    running=None,
):
    return Engine(
        name=name,
        capacity=capacity,
        spec_hash=spec_hash,
        serving=serving,
        ready=ready,
        failed=failed,
        terminating=terminating,
        created=at(-age),
        drain_since=None if drain_age is None else at(-drain_age),
        drain_deadline=drain_deadline,
        node=node or f"node-{name}",
        running_requests=running,
    )


def plan(engines, desired=3, baseline=1, spot=True, signals=None):
    return plan_engines(
        engines,
        target=capacity_split(desired, baseline, spot),
        spec_hash=HASH,
        now=NOW,
        timing=TIMING,
        node_signals=signals,
    )


def names(drains):
    return sorted(d.name for d in drains)


def test_capacity_split():
    assert capacity_split(3, 1, True) == {"on-demand": 1, "spot": 2}
    assert capacity_split(3, 5, True) == {"on-demand": 3, "spot": 0}
    assert capacity_split(3, 1, False) == {"on-demand": 3, "spot": 0}
    assert capacity_split(0, 1, True) == {"on-demand": 0, "spot": 0}


def test_from_nothing_creates_baseline_on_demand_and_rest_spot():
    result = plan([])
    assert sorted(result.create) == ["on-demand", "spot", "spot"]
    assert result.drain == [] and result.delete == []


def test_steady_state_does_nothing():
    assert plan([engine("a", render.ON_DEMAND), engine("b"), engine("c")]).empty


def test_vanished_engine_is_replaced_with_its_capacity_type():
    assert plan([engine("a", render.ON_DEMAND), engine("b")]).create == ["spot"]


def test_failed_engine_is_deleted_and_replaced():
    result = plan([engine("a", render.ON_DEMAND), engine("b"), engine("c", failed=True)])
    assert result.delete == ["c"] and result.create == ["spot"]


def test_scale_in_drains_not_ready_first_then_youngest():
    engines = [
        engine("a", render.ON_DEMAND),
        engine("old"),
        engine("young", age=60),
        engine("cold", ready=False, age=900),
    ]
    result = plan(engines, desired=2)
    assert [d.name for d in result.drain] == ["cold", "young"]
    assert all(d.deadline == at(90) for d in result.drain)
    assert result.delete == [] and result.create == []


def test_draining_engine_waits_for_grace_then_for_idle_or_deadline():
    serving = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    busy_early = engine("d", serving=False, drain_age=2, drain_deadline=at(60), running=0)
    assert plan(serving + [busy_early]).empty  # idle, but gateways may not have seen it leave
    busy = engine("d", serving=False, drain_age=30, drain_deadline=at(60), running=3)
    assert plan(serving + [busy]).empty  # still answering
    idle = engine("d", serving=False, drain_age=30, drain_deadline=at(60), running=0)
    assert plan(serving + [idle]).delete == ["d"]
    unknown_overdue = engine("d", serving=False, drain_age=100, drain_deadline=at(-1), running=None)
    assert plan(serving + [unknown_overdue]).delete == ["d"]
    busy_overdue = engine("d", serving=False, drain_age=100, drain_deadline=at(-1), running=5)
    assert plan(serving + [busy_overdue]).delete == ["d"]  # a drain ends at its deadline, never later


def test_an_engine_taken_out_of_serving_by_hand_gets_a_drain_record():
    result = plan([engine("a", render.ON_DEMAND), engine("b"), engine("c"), engine("d", serving=False)])
    assert result.drain == [Drain("d", "not serving", at(90))]


def test_terminating_engines_are_ignored_and_replaced():
    assert plan([engine("a", render.ON_DEMAND), engine("b"), engine("c", terminating=True)]).create == ["spot"]


def test_rollout_creates_new_engines_first_and_keeps_old_ones_serving():
    old = [engine("a", render.ON_DEMAND, spec_hash="old"), engine("b", spec_hash="old"), engine("c", spec_hash="old")]
    first = plan(old)
    assert sorted(first.create) == ["on-demand", "spot", "spot"] and first.drain == []
    starting = old + [engine("n1", render.ON_DEMAND, ready=False), engine("n2", ready=False), engine("n3")]
    second = plan(starting)
    assert second.empty
    assert any("1/3 new engines ready" in note for note in second.notes)
    third = plan(old + [engine("n1", render.ON_DEMAND), engine("n2"), engine("n3")])
    assert names(third.drain) == ["a", "b", "c"] and third.create == []


def test_spot_off_moves_everything_to_on_demand_without_gaps():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    result = plan(engines, spot=False)
    assert result.create == ["on-demand", "on-demand"]
    assert result.drain == []  # the spot engines serve until their replacements are ready
    engines += [engine("d", render.ON_DEMAND, age=30), engine("e", render.ON_DEMAND, ready=False, age=30)]
    assert [d.name for d in plan(engines, spot=False).drain] == ["b"]
    engines[-1] = engine("e", render.ON_DEMAND, age=30)
    assert names(plan(engines, spot=False).drain) == ["b", "c"]


def signal(node, action=Action.DRAIN, deadline=None, kind="spot-interruption"):
    return NodeSignal(node, "aws-node-termination-handler", kind, action, deadline)


def test_interruption_drains_at_once_and_replaces():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    result = plan(engines, signals={"node-b": signal("node-b", deadline=at(120))})
    assert [d.name for d in result.drain] == ["b"]
    assert result.drain[0].deadline == at(110)  # the node's deadline minus the margin
    assert result.drain[0].reason.startswith(
        "interruption: aws-node-termination-handler spot-interruption on node node-b"
    )
    assert result.create == ["spot"]


def test_short_notice_deadline_is_not_in_the_past():
    result = plan(
        [engine("a", render.ON_DEMAND), engine("b"), engine("c")], signals={"node-c": signal("node-c", deadline=at(3))}
    )
    assert result.drain[0].deadline == NOW


def test_cordon_without_deadline_waits_up_to_the_drain_timeout():
    result = plan(
        [engine("a", render.ON_DEMAND), engine("b"), engine("c")], signals={"node-a": signal("node-a", kind="cordon")}
    )
    assert [(d.name, d.deadline) for d in result.drain] == [("a", at(90))]
    assert result.create == ["on-demand"]


def test_two_nodes_at_once():
    signals = {"node-b": signal("node-b", deadline=at(30)), "node-c": signal("node-c", deadline=at(120))}
    result = plan([engine("a", render.ON_DEMAND), engine("b"), engine("c")], signals=signals)
    assert names(result.drain) == ["b", "c"] and result.create == ["spot", "spot"]


def test_rebalance_prewarms_a_replacement_without_draining():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    signals = {"node-b": signal("node-b", Action.PREWARM, kind="rebalance-recommendation")}
    result = plan(engines, signals=signals)
    assert result.create == ["spot"] and result.drain == []
    # The replacement is up and the signal is still there: nothing more.
    engines.append(engine("d", age=10))
    assert plan(engines, signals=signals).empty
    # The node is then interrupted: only b leaves, d already carries its share.
    interrupted = plan(engines, signals={"node-b": signal("node-b", deadline=at(120))})
    assert [d.name for d in interrupted.drain] == ["b"] and interrupted.create == []


def test_engine_from_pod_reads_labels_conditions_and_annotations():
    pod = {
        "metadata": {
            "name": "x",
            "creationTimestamp": "2026-11-21T11:00:00Z",
            "labels": {render.LABEL_CAPACITY: "on-demand", render.LABEL_SPEC_HASH: "h", render.LABEL_SERVING: "false"},
            "annotations": {
                "spotrag.io/drain-since": "2026-11-21T11:59:00Z",
                "spotrag.io/drain-deadline": "2026-11-21T12:01:00Z",
            },
        },
        "spec": {"nodeName": "node-1"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    parsed = Engine.from_pod(pod, running_requests=2)
    assert (parsed.capacity, parsed.spec_hash, parsed.serving, parsed.ready, parsed.node, parsed.running_requests) == (
        "on-demand",
        "h",
        False,
        True,
        "node-1",
        2,
    )
    assert parsed.drain_since == at(-60) and parsed.drain_deadline == at(60)


def test_given_up_pending_spot_engines_are_drained_and_replaced_on_demand():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("stuck", ready=False, node=None)]
    object.__setattr__(engines[-1], "node", None)
    result = plan_engines(
        engines, target={"on-demand": 2, "spot": 1}, spec_hash=HASH, now=NOW, timing=TIMING, give_up={"stuck"}
    )
    assert [(d.name, d.deadline) for d in result.drain] == [("stuck", NOW)]
    assert result.create == ["on-demand"]


def pod_in_state(name, *, serving=True, drain_since=None, drain_deadline=None, node="node-x"):
    """An engine pod as the operator leaves it: the drain state is only on the pod."""
    from spotrag_operator.status import now_iso

    annotations = {}
    if drain_since is not None:
        annotations = {
            "spotrag.io/drain-since": now_iso(drain_since),
            "spotrag.io/drain-reason": "interruption",
            "spotrag.io/drain-deadline": now_iso(drain_deadline),
        }
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2026-11-21T11:00:00Z",
            "annotations": annotations,
            "labels": {
                render.LABEL_CAPACITY: "spot",
                render.LABEL_SPEC_HASH: HASH,
                render.LABEL_SERVING: "true" if serving else "false",
            },
        },
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


RESTART_CASES = [
    # (state when the operator restarted, pod, running requests, node signal, expected (drain, delete))
    ("serving, node just tainted", pod_in_state("x"), None, signal("node-x", deadline=at(120)), (["x"], [])),
    (
        "draining, inside the grace",
        pod_in_state("x", serving=False, drain_since=at(-2), drain_deadline=at(100)),
        0,
        None,
        ([], []),
    ),
    (
        "draining, still answering",
        pod_in_state("x", serving=False, drain_since=at(-30), drain_deadline=at(100)),
        4,
        None,
        ([], []),
    ),
    (
        "draining, idle",
        pod_in_state("x", serving=False, drain_since=at(-30), drain_deadline=at(100)),
        0,
        None,
        ([], ["x"]),
    ),
    (
        "draining, past the deadline",
        pod_in_state("x", serving=False, drain_since=at(-130), drain_deadline=at(-10)),
        4,
        None,
        ([], ["x"]),
    ),
]


@pytest.mark.parametrize("state, pod, running, node_signal, expected", RESTART_CASES, ids=[c[0] for c in RESTART_CASES])
def test_a_restarted_operator_continues_every_drain_state_from_the_pod_alone(
    state, pod, running, node_signal, expected
):
    others = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    restarted = Engine.from_pod(pod, running_requests=running)
    result = plan_engines(
        others + [restarted],
        target=capacity_split(3, 1, True),
        spec_hash=HASH,
        now=NOW,
        timing=TIMING,
        node_signals={"node-x": node_signal} if node_signal else None,
    )
    assert ([d.name for d in result.drain], result.delete) == expected
