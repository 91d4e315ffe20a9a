"""The engine plan on constructed pod lists: exact expected actions."""

from __future__ import annotations

import datetime

from spotrag_operator import render
from spotrag_operator.plan import Drain, Engine, capacity_split, plan_engines

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
HASH = "new"


def engine(name, capacity=render.SPOT, *, spec_hash=HASH, serving=True, ready=True, failed=False, terminating=False, age=600, drain_age=None):
    return Engine(
        name=name,
        capacity=capacity,
        spec_hash=spec_hash,
        serving=serving,
        ready=ready,
        failed=failed,
        terminating=terminating,
        created=NOW - datetime.timedelta(seconds=age),
        drain_since=None if drain_age is None else NOW - datetime.timedelta(seconds=drain_age),
    )


def plan(engines, desired=3, baseline=1, spot=True, grace=5):
    return plan_engines(engines, desired=desired, baseline=baseline, spot_enabled=spot, spec_hash=HASH, now=NOW, drain_grace=grace)


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
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    assert plan(engines).empty


def test_vanished_engine_is_replaced_with_its_capacity_type():
    engines = [engine("a", render.ON_DEMAND), engine("b")]
    assert plan(engines).create == ["spot"]


def test_failed_engine_is_deleted_and_replaced():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c", failed=True)]
    result = plan(engines)
    assert result.delete == ["c"] and result.create == ["spot"]


def test_scale_in_drains_not_ready_first_then_youngest():
    engines = [engine("a", render.ON_DEMAND), engine("old"), engine("young", age=60), engine("cold", ready=False, age=900)]
    result = plan(engines, desired=2)
    assert [d.name for d in result.drain] == ["cold", "young"]
    assert result.delete == [] and result.create == []


def test_draining_engine_is_deleted_only_after_the_grace():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c"), engine("d", serving=False, drain_age=2)]
    assert plan(engines, grace=5).empty
    engines[-1] = engine("d", serving=False, drain_age=6)
    assert plan(engines, grace=5).delete == ["d"]


def test_an_engine_taken_out_of_serving_by_hand_starts_its_drain_clock():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c"), engine("d", serving=False)]
    assert plan(engines).drain == [Drain("d", "not serving")]


def test_terminating_engines_are_ignored_and_replaced():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c", terminating=True)]
    assert plan(engines).create == ["spot"]


def test_rollout_creates_new_engines_first_and_keeps_old_ones_serving():
    old = [engine("a", render.ON_DEMAND, spec_hash="old"), engine("b", spec_hash="old"), engine("c", spec_hash="old")]
    first = plan(old)
    assert sorted(first.create) == ["on-demand", "spot", "spot"] and first.drain == []
    starting = old + [engine("n1", render.ON_DEMAND, ready=False), engine("n2", ready=False), engine("n3")]
    second = plan(starting)
    assert second.empty  # waiting for the new ones; the old ones still serve
    assert any("1/3 new engines ready" in note for note in second.notes)
    ready = old + [engine("n1", render.ON_DEMAND), engine("n2"), engine("n3")]
    third = plan(ready)
    assert sorted(d.name for d in third.drain) == ["a", "b", "c"]
    assert third.create == []


def test_spot_off_moves_everything_to_on_demand_without_gaps():
    engines = [engine("a", render.ON_DEMAND), engine("b"), engine("c")]
    result = plan(engines, spot=False)
    assert result.create == ["on-demand", "on-demand"]
    assert result.drain == []  # the spot engines serve until their replacements are ready
    engines += [engine("d", render.ON_DEMAND, age=30), engine("e", render.ON_DEMAND, ready=False, age=30)]
    assert [d.name for d in plan(engines, spot=False).drain] == ["b"]
    engines[-1] = engine("e", render.ON_DEMAND, age=30)
    assert sorted(d.name for d in plan(engines, spot=False).drain) == ["b", "c"]


def test_engine_from_pod_reads_labels_conditions_and_annotations():
    pod = {
        "metadata": {
            "name": "x",
            "creationTimestamp": "2026-11-21T11:00:00Z",
            "labels": {render.LABEL_CAPACITY: "on-demand", render.LABEL_SPEC_HASH: "h", render.LABEL_SERVING: "false"},
            "annotations": {"spotrag.io/drain-since": "2026-11-21T11:59:00Z"},
        },
        "spec": {"nodeName": "node-1"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    parsed = Engine.from_pod(pod)
    assert (parsed.capacity, parsed.spec_hash, parsed.serving, parsed.ready, parsed.node) == ("on-demand", "h", False, True, "node-1")
    assert parsed.drain_since == datetime.datetime(2026, 11, 21, 11, 59, tzinfo=datetime.UTC)
