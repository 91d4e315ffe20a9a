"""The whole plan of a reconcile from one observation (reconcile.plan_reconcile),
without a cluster: what it writes, the Events and counts it plans, and that
a second look at an unchanged world plans nothing."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec
from spotrag_operator.metrics import Count
from spotrag_operator.observe import Observed
from spotrag_operator.plan import Engine
from spotrag_operator.queued_tokens import QueuedWork
from spotrag_operator.reconcile import DeleteAction, Event, plan_reconcile

from .operator_fixtures import ragdeployment

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
DOCS = ("ConfigMap", "handbook-docs")
CORPUS = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"a.md": "# A"}}
LABELS = ("default", "handbook")


def observed(
    overrides: dict | None = None,
    *,
    engines: list[Engine] = (),
    nodes: dict | None = None,
    queued: float | None = 0.0,
    found: dict | None = None,
    jobs: list[dict] = (),
    result: dict | None = None,
    status: dict | None = None,
) -> Observed:
    body = ragdeployment(overrides)
    body["status"] = status or {}
    return Observed(
        body=body,
        spec=defaulted_spec(body),
        now=NOW,
        engines=list(engines),
        nodes=nodes or {},
        work=None if queued is None else QueuedWork(tokens=queued),
        metric_problem="" if queued is not None else "no ready gateway to read queued tokens from",
        found={DOCS: CORPUS} if found is None else found,
        index_jobs=list(jobs),
        index_result=result or {},
    )


def engine(name: str, capacity: str = render.ON_DEMAND, *, node: str = "gpu-1", **facts) -> Engine:
    spec_hash = render.engine_spec_hash(defaulted_spec(ragdeployment()))
    values = dict(
        name=name,
        capacity=capacity,
        spec_hash=spec_hash,
        serving=True,
        ready=True,
        failed=False,
        terminating=False,
        created=NOW - datetime.timedelta(minutes=10),
        node=node,
    )
    return Engine(**(values | facts))


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_new_deployment_creates_its_engines_and_index_job_and_says_so():
    plan = plan_reconcile(observed({"scaling": {"minReplicas": 3}}), None)
    assert [capacity for capacity, _ in plan.creates] == ["on-demand", "spot", "spot"]
    assert all(pod["metadata"]["labels"][render.LABEL_SERVING] == "true" for _, pod in plan.creates)
    assert plan.drains == [] and plan.deletes == []
    assert plan.index.create is not None and plan.index.delete == ()
    job = plan.index.create["metadata"]["name"]
    assert plan.announce == [Event("SpotAvailable", "1 on-demand (baseline), 2 spot")]
    assert plan.report == [Event("IndexBuilding", f"index Job {job} started for the current corpus")]
    # Status describes the outcome: the engines it is creating count as starting.
    status = plan.status
    assert (status["engines"], status["spotReplicas"], status["onDemandReplicas"]) == ("0/3", 2, 1)
    assert conditions(status)["Ready"]["reason"] == "EnginesStarting"
    assert conditions(status)["IndexReady"]["reason"] == "Building"
    assert plan.persist and status["scaling"]["placementReason"] == "SpotAvailable"
    assert plan.gauges.desired == 3 and len(plan.gauges.engines) == 3


def test_an_unchanged_world_seen_again_plans_nothing():
    first = plan_reconcile(observed(), None)
    # What the cluster holds once the first plan is written: the pod named and bound, the Job running.
    pods = [dataclasses.replace(e, name=f"engine-{i}", node="gpu-1") for i, e in enumerate(first.gauges.engines)]
    world = {"engines": pods, "jobs": [first.index.create]}
    second = plan_reconcile(observed(**world, status=first.status), first.memory)
    # Only status follows (the pod has a node now, the Job runs); nothing else is planned.
    assert (second.creates, second.drains, second.deletes, second.index.create) == ([], [], [], None)
    assert second.announce == [] and second.report == [] and second.status is not None
    third = plan_reconcile(observed(**world, status=second.status), second.memory)
    assert (third.creates, third.drains, third.deletes, third.index.create) == ([], [], [], None)
    assert third.announce == [] and third.report == [] and third.counts == []
    assert third.status is None  # nothing to write


def test_an_engine_on_a_cordoned_node_leaves_serving_with_its_events_and_counts():
    cordoned = {"metadata": {"name": "gpu-1"}, "spec": {"unschedulable": True}}
    plan = plan_reconcile(observed(engines=[engine("e1")], nodes={"gpu-1": cordoned}), None)
    (drain,) = plan.drains
    assert drain.name == "e1" and drain.patch["metadata"]["labels"] == {render.LABEL_SERVING: "false"}
    assert list(drain.events) == [
        Event(
            "EngineInterrupted",
            "e1: interruption: kubernetes cordon on node gpu-1; out of serving, replacement started, "
            "deleted by 2026-11-21T12:01:30Z at the latest",
            warning=True,
        )
    ]
    assert list(drain.counts) == [
        Count("drains", (*LABELS, "interruption")),
        Count("interruptions", (*LABELS, "kubernetes")),
    ]
    assert [capacity for capacity, _ in plan.creates] == ["on-demand"]  # its replacement, at once
    assert plan.status["drainingReplicas"] == 1


def test_a_healthy_node_drains_nothing():
    plan = plan_reconcile(observed(engines=[engine("e1")], nodes={"gpu-1": {"metadata": {"name": "gpu-1"}}}), None)
    assert plan.drains == [] and plan.creates == [] and plan.status["engines"] == "1/1"


def test_an_engine_out_of_serving_without_a_record_is_drained_and_an_idle_drained_one_deleted():
    drained = engine(
        "old",
        serving=False,
        drain_since=NOW - datetime.timedelta(seconds=30),
        drain_deadline=NOW + datetime.timedelta(minutes=1),
        running_requests=0,
    )
    flipped = engine("flipped", serving=False, running_requests=2)
    plan = plan_reconcile(observed(engines=[engine("e1"), drained, flipped]), None)
    assert plan.deletes == [DeleteAction("old", Event("EngineDeleted", "deleted old after draining 30s (idle)"))]
    (drain,) = plan.drains
    assert drain.name == "flipped" and list(drain.events) == [Event("EngineDraining", "flipped: not serving")]
    assert list(drain.counts) == [Count("drains", (*LABELS, "not serving"))]


MISSING_KEYS = (
    "gateway.apiKeySecret names Secret 'keys', which does not exist in namespace 'default': "
    "create it or remove the field"
)


@pytest.mark.parametrize(
    ("old_status", "events"),
    [
        ({}, [Event("InvalidConfiguration", MISSING_KEYS, warning=True)]),
        # Said already: the condition carries it, no second Event.
        ({"conditions": [{"type": "Degraded", "status": "True", "message": MISSING_KEYS}]}, []),
    ],
)
def test_a_missing_secret_degrades_and_is_said_once(old_status, events):
    plan = plan_reconcile(observed({"gateway": {"apiKeySecret": "keys"}}, status=old_status), None)
    degraded = conditions(plan.status)["Degraded"]
    assert (degraded["status"], degraded["message"]) == ("True", MISSING_KEYS)
    assert [e for e in plan.report if e.reason == "InvalidConfiguration"] == events


def index_job(name: str, digest_of: Observed, *, status: dict) -> dict:
    job = plan_reconcile(digest_of, None).index.create
    return job | {"metadata": job["metadata"] | {"name": name}, "status": status}


@pytest.mark.parametrize(
    ("job_status", "result", "reason", "event", "deleted"),
    [
        ({"succeeded": 1}, {"version": "v7", "count": 42}, "IndexBuilt", Event("IndexIndexBuilt", "x"), ("old",)),
        (
            {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "message": "no documents"}]},
            {},
            "IndexJobFailed",
            Event("IndexIndexJobFailed", "x", warning=True),
            (),
        ),
        ({}, {}, "Building", Event("IndexBuilding", "x"), ()),
    ],
)
def test_the_index_job_becomes_index_ready(job_status, result, reason, event, deleted):
    current = index_job("current", observed(), status=job_status)
    old = current | {"metadata": {"name": "old", "annotations": {"spotrag.io/corpus-hash": "before"}}}
    plan = plan_reconcile(observed(jobs=[old, current], result=result), None)
    assert plan.index.create is None and plan.index.delete == deleted
    assert conditions(plan.status)["IndexReady"]["reason"] == reason
    assert [dataclasses.replace(e, message="x") for e in plan.report] == [event]
    if result:
        assert plan.status["index"]["version"] == "v7" and plan.status["index"]["passages"] == 42


def test_without_queued_tokens_scaling_is_inactive_and_holds():
    plan = plan_reconcile(observed(engines=[engine("e1")], queued=None), None)
    scaling = conditions(plan.status)["ScalingActive"]
    assert scaling["status"] == "False" and plan.status["queuedTokens"] is None
    assert plan.gauges.desired == 1 and plan.creates == []


# Sizing to the SLO: calibration kept in status, status.sizing, SLOReachable ----------------

SPLIT = QueuedWork(tokens=12_000, prompt_tokens=8_000, output_tokens=4_000, waiting_requests=4)
STORED_CALIBRATION = {"feedback": 1.2, "meanPromptTokens": 1000.0, "promptRate": 500.0, "ratesAt": 1.0}
UNREACHABLE = {"scaling": {"slo": {"ttftSeconds": 0.1}}}  # 1000 tokens at the L4 preset's 4172 tok/s: 0.24 s


def slo_observed(overrides: dict | None = None, *, work: QueuedWork | None = SPLIT, status: dict | None = None):
    return dataclasses.replace(observed(overrides, engines=[engine("e1")], status=status), work=work)


@pytest.mark.parametrize(
    ("stored", "feedback", "mean_prompt"),
    [
        (STORED_CALIBRATION, 1.2, 1000.0),
        ({"xx": [[1.0]]}, 1.0, None),  # malformed: calibration starts afresh
        (None, 1.0, None),
    ],
)
def test_calibration_is_restored_from_status_and_persisted_again(stored, feedback, mean_prompt):
    status = {"scaling": {"autoscaler": {"desired": 2}} | ({"calibration": stored} if stored else {})}
    plan = plan_reconcile(slo_observed(status=status), None)
    assert plan.memory.calibration.feedback == feedback
    assert plan.memory.calibration.mean_prompt_tokens == mean_prompt
    # The first reconcile after a restart writes the memory: calibration with it.
    assert plan.persist
    assert plan.status["scaling"]["calibration"] == plan.memory.calibration.to_dict()
    assert plan.status["sizing"]["feedback"] == feedback


@pytest.mark.parametrize(
    ("overrides", "work", "basis"),
    [
        (None, SPLIT, "slo"),
        ({"scaling": {"targetQueuedTokensPerReplica": 1000}}, SPLIT, "targetQueuedTokensPerReplica"),
        (None, QueuedWork(tokens=12_000), "targetQueuedTokensPerReplica"),  # an old gateway: no split, 2048 each
        (None, None, "unavailable"),
    ],
)
def test_status_sizing_says_what_the_recommendation_was_sized_on(overrides, work, basis):
    plan = plan_reconcile(slo_observed(overrides, work=work), None)
    sizing = plan.status["sizing"]
    assert sizing["basis"] == basis
    assert sizing["rates"]["prefillTokensPerSecond"] == pytest.approx(4172)  # the L4 preset, nothing measured yet
    assert sizing["rates"]["source"].startswith("L4/Mistral-7B")
    if basis == "slo":
        assert sizing["prefillBacklog"] > 0 and sizing["engines"] > 1
        assert plan.gauges.desired > 1  # 8000 queued prompt tokens need more than one L4


def test_status_sizing_follows_the_persist_cadence():
    first = plan_reconcile(slo_observed(), None)
    assert first.persist and first.status["sizing"]["basis"] == "slo"
    remembered = dataclasses.replace(first.memory, persisted_at=NOW.timestamp())
    # Seconds later, less work: the decision stands (the scale-down window), nothing is persisted,
    # and the sizing shown stays the one that goes with the persisted memory.
    later = dataclasses.replace(
        slo_observed(status=first.status), now=NOW + datetime.timedelta(seconds=5), work=QueuedWork(0, 0, 0, 0)
    )
    second = plan_reconcile(later, remembered)
    assert not second.persist
    assert (second.status or first.status)["sizing"] == first.status["sizing"]
    assert second.memory.calibration.to_dict()["feedback"] == 1.0


def test_an_slo_below_one_prefill_is_reported_once_and_clears():
    status = {"scaling": {"calibration": STORED_CALIBRATION}}
    first = plan_reconcile(slo_observed(UNREACHABLE, status=status), None)
    reach = conditions(first.status)["SLOReachable"]
    assert (reach["status"], reach["reason"]) == ("False", "SLOBelowPrefill")
    assert "the TTFT SLO of 0.1s is below one prefill of the mean prompt: 1000 tokens" in reach["message"]
    assert first.status["sizing"]["sloProblem"] == reach["message"]
    assert [e for e in first.announce if e.reason == "SLOBelowPrefill"] == [
        Event("SLOBelowPrefill", reach["message"], warning=True)
    ]
    # Still out of reach: the condition says it, no second Event.
    second = plan_reconcile(slo_observed(UNREACHABLE, status=first.status), first.memory)
    assert conditions(second.status or first.status)["SLOReachable"]["status"] == "False"
    assert [e for e in second.announce if e.reason == "SLOBelowPrefill"] == []
    # A reachable SLO: True again, and no Event.
    third = plan_reconcile(slo_observed(status=second.status or first.status), second.memory)
    reach = conditions(third.status)["SLOReachable"]
    assert (reach["status"], reach["reason"]) == ("True", "PrefillWithinSLO")
    assert [e for e in third.announce if e.reason == "SLOBelowPrefill"] == []


@pytest.mark.parametrize(
    ("overrides", "status", "reason"),
    [
        (None, {}, "NoPromptSeen"),
        (None, {"scaling": {"calibration": STORED_CALIBRATION}}, "PrefillWithinSLO"),
        ({"scaling": {"targetQueuedTokensPerReplica": 1000}}, {}, "SizedOnTarget"),
        # An explicit target is not held to the SLO: nothing to report even when the SLO is out of reach.
        (
            {"scaling": {"targetQueuedTokensPerReplica": 1000, "slo": {"ttftSeconds": 0.1}}},
            {"scaling": {"calibration": STORED_CALIBRATION}},
            "SizedOnTarget",
        ),
    ],
)
def test_slo_reachable_is_true_otherwise(overrides, status, reason):
    plan = plan_reconcile(slo_observed(overrides, status=status), None)
    reach = conditions(plan.status)["SLOReachable"]
    assert (reach["status"], reach["reason"]) == ("True", reason)
    assert not any(e.reason == "SLOBelowPrefill" for e in plan.announce)


SCALE_TO_ZERO = {"scaling": {"minReplicas": 0, "onDemandBaseline": 0, "scaleDownStabilizationSeconds": 0}}


def test_an_idle_scale_to_zero_deployment_drains_its_last_engine_and_says_scaled_to_zero():
    plan = plan_reconcile(observed(SCALE_TO_ZERO, engines=[engine("e1", render.SPOT)], queued=0.0), None)
    assert [d.name for d in plan.drains] == ["e1"] and plan.creates == []
    assert plan.status["desiredReplicas"] == 0 and plan.status["engines"] == "0/0"
    ready = conditions(plan.status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")


def test_a_request_held_at_zero_starts_an_engine_in_the_same_reconcile():
    idle = plan_reconcile(observed(SCALE_TO_ZERO, queued=0.0), None)
    assert idle.creates == [] and conditions(idle.status)["Ready"]["reason"] == "ScaledToZero"
    held = plan_reconcile(observed(SCALE_TO_ZERO, queued=40.0, status=idle.status), idle.memory)
    assert [capacity for capacity, _ in held.creates] == ["spot"]
    assert conditions(held.status)["Ready"]["reason"] == "EnginesStarting"


def test_scale_to_zero_renders_a_gateway_that_holds_requests_while_no_engine_runs():
    body = ragdeployment(SCALE_TO_ZERO)
    admission = render.gateway_config(body, defaulted_spec(body))["admission"]
    assert admission["queueWithoutEngines"] is True and admission["coldStartTimeoutSeconds"] == 600
    kept_warm = ragdeployment()
    assert "queueWithoutEngines" not in render.gateway_config(kept_warm, defaulted_spec(kept_warm))["admission"]


def _pod_with_cache_message(message: str, annotations: dict | None = None) -> dict:
    return {
        "metadata": {"name": "e1", "annotations": annotations or {}, "creationTimestamp": "2026-11-21T11:50:00Z"},
        "spec": {"nodeName": "gpu-1"},
        "status": {
            "initContainerStatuses": [
                {"name": render.CACHE_INIT_CONTAINER, "state": {"terminated": {"exitCode": 0, "message": message}}}
            ]
        },
    }


def test_an_engine_that_started_without_the_node_cache_is_said_once_as_why_it_was_slow():
    why = "node model cache unusable: /var/cache/spotrag/node has 3.0 GiB free, less than the 40 GiB asked (minFreeGi)"
    slow = Engine.from_pod(_pod_with_cache_message(why))
    assert slow.cache_problem == why
    assert Engine.from_pod(_pod_with_cache_message("using the node's model cache (/x)")).cache_problem is None
    reported = Engine.from_pod(_pod_with_cache_message(why, {"spotrag.io/model-cache-reported": "true"}))
    assert reported.cache_problem is None
    plan = plan_reconcile(observed(engines=[engine("e1", cache_problem=why)]), None)
    [note] = [d for d in plan.drains if d.name == "e1"]
    assert note.patch == {"metadata": {"annotations": {"spotrag.io/model-cache-reported": "true"}}}
    [event] = note.events
    assert event.reason == "ModelCacheUnusable" and event.warning and "3.0 GiB free" in event.message
    assert plan.engines.drain == []  # a note, not a drain: the engine keeps serving


def test_a_request_held_while_the_only_engine_drains_to_zero_starts_the_next_engine():
    draining = engine(
        "e1",
        render.SPOT,
        serving=False,
        drain_since=NOW - datetime.timedelta(seconds=2),
        drain_deadline=NOW + datetime.timedelta(seconds=60),
        running_requests=1,
    )
    idle = plan_reconcile(observed(SCALE_TO_ZERO, engines=[draining], queued=0.0), None)
    assert idle.creates == [] and idle.status["desiredReplicas"] == 0
    held = plan_reconcile(observed(SCALE_TO_ZERO, engines=[draining], queued=25.0, status=idle.status), idle.memory)
    assert [capacity for capacity, _ in held.creates] == ["spot"]  # the next engine, while e1 finishes
    assert held.deletes == [] and held.status["desiredReplicas"] == 1
