"""Decide: from one observation of a RAGDeployment, the whole plan of a
reconcile, without touching the cluster (KubeAI's observe → plan → execute).

`plan_reconcile` returns what to write (engine drains, creates and deletes,
the index Job action, the status), the Events to post and the metric samples
to record; `execute.py` writes it. The autoscaler's and placement's memory
goes in and comes out as values, so a table of observations tests it all.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field

from . import render
from .autoscale import AutoscalerState, ScalingPolicy, ScalingStep, observation_from, scale
from .calibration import CalibrationState
from .checks import find_problems
from .groups import fitting_nodes
from .index_job import IndexPlan, plan_index
from .metrics import Count, EngineGauges
from .observe import Observed
from .placement import DRAINING, PENDING, READY, STARTING, EngineView, Placement, PlacementState, SpotSettings, place
from .plan import (
    ANNOTATION_CACHE_REPORTED,
    ANNOTATION_DRAIN_DEADLINE,
    ANNOTATION_DRAIN_REASON,
    ANNOTATION_DRAIN_SINCE,
    Drain,
    DrainTiming,
    Engine,
    EnginePlan,
    plan_engines,
)
from .signals import Action, node_signal
from .standby import ANNOTATION_SLEEP_ASKED, StandbyPlan, plan_standbys, standby_capacity
from .status import cost_per_hour, engines_status, now_iso, set_condition, status_changed

# Scaling memory reaches status when a decision changes, else at most this often.
PERSIST_EVERY = 60.0

SLO_REACHABLE = "SLOReachable"
SLO_BELOW_PREFILL = "SLOBelowPrefill"


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class ScalingMemory:
    """The autoscaler's, calibration's and placement's state between
    reconciles. Kept in memory and written to status when a decision changes
    or every PERSIST_EVERY seconds, so a restarted operator picks it up
    without every reconcile writing status."""

    autoscaler: AutoscalerState
    placement: PlacementState
    persisted_at: float
    calibration: CalibrationState = field(default_factory=CalibrationState)

    @classmethod
    def from_status(cls, status: dict) -> ScalingMemory:
        stored = status.get("scaling") or {}
        try:
            autoscaler = AutoscalerState.from_dict(stored.get("autoscaler"))
        except ValueError:
            autoscaler = AutoscalerState()
        try:
            placement = PlacementState.from_dict(stored.get("placement"))
        except ValueError:
            placement = PlacementState()
        try:
            calibration = CalibrationState.from_dict(stored.get("calibration"))
        except ValueError:
            calibration = CalibrationState()
        return cls(autoscaler, placement, persisted_at=0.0, calibration=calibration)


@dataclass(frozen=True)
class DrainAction:
    """A patch of an engine pod (out of serving, or a note on it); its Events and counts only if it still exists."""

    name: str
    patch: dict
    events: tuple[Event, ...]
    counts: tuple[Count, ...]
    # What the patch goes to, in order: the pod; for an engine group its
    # LeaderWorkerSet (the drain's record) then its leader (out of the Service).
    targets: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class DeleteAction:
    name: str
    event: Event  # posted only if the pod was still there
    api_version: str = "v1"
    kind: str = "Pod"  # an engine group goes as its LeaderWorkerSet, all its pods with it


@dataclass(frozen=True)
class WakeAction:
    """Wake a standby instead of starting an engine cold; on failure delete it and create `fallback`."""

    name: str
    url: str
    capacity: str
    timeout: float
    patch: dict  # into the serving set, no longer a standby
    fallback: dict  # the cold engine pod that replaces a standby that did not wake


@dataclass(frozen=True)
class SleepAction:
    name: str
    url: str
    patch: dict  # when the sleep was asked for


@dataclass
class ReconcilePlan:
    memory: ScalingMemory  # kept before any write, as the decision stands even if a write fails
    announce: list[Event]  # the scaling decision's Events, posted before any write
    counts: list[Count]  # counted with them
    engines: EnginePlan
    drains: list[DrainAction]
    creates: list[tuple[str, dict]]  # (capacity, engine pod manifest)
    deletes: list[DeleteAction]
    index: IndexPlan
    report: list[Event]  # index and configuration Events, after the writes
    gauges: EngineGauges
    status: dict | None  # the status to write; None: unchanged
    persist: bool  # the status carries the scaling memory (its time is then remembered)
    notes: list[str] = field(default_factory=list)
    wakes: list[WakeAction] = field(default_factory=list)  # standbys woken instead of cold starts
    sleeps: list[SleepAction] = field(default_factory=list)  # standbys to put to sleep


def drain_timing(spec: dict) -> DrainTiming:
    interruption = spec["interruption"]
    return DrainTiming(
        grace=interruption["preStopSeconds"],
        timeout=interruption["drainTimeoutSeconds"],
        # The pod needs its preStop wait plus a moment to stop before the node goes.
        margin=interruption["preStopSeconds"] + 5,
    )


def placement_view(engine: Engine, nodes: dict[str, dict]) -> EngineView:
    node_labels = (nodes.get(engine.node or "") or {}).get("metadata", {}).get("labels") or {}
    phase = DRAINING if engine.draining else READY if engine.ready else STARTING if engine.node else PENDING
    return EngineView(
        name=engine.name,
        capacity=engine.capacity,
        phase=phase,
        since=engine.created.timestamp(),
        zone=node_labels.get("topology.kubernetes.io/zone"),
        instance_type=node_labels.get("node.kubernetes.io/instance-type"),
    )


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def plan_reconcile(observed: Observed, memory: ScalingMemory | None) -> ReconcilePlan:
    """`memory`: what the previous reconcile kept (None: read it from status).

    Three steps: how many engines (the autoscaler and placement), which pods
    change to get there (`_plan_fleet`), and what the status says after
    (`_plan_status`)."""
    body = observed.body
    meta = body["metadata"]
    old_status = body.get("status") or {}
    memory = memory or ScalingMemory.from_status(old_status)

    step, placement, memory = _scale(observed, memory)
    announce, counts = _scaling_events(step, placement, old_status, (meta["namespace"], meta["name"]))
    fleet = _plan_fleet(observed, placement)
    problems = find_problems(observed.spec, meta["namespace"], observed.found)
    corpus_map = (observed.spec["retrieval"].get("corpus") or {}).get("configMap") or ""
    index = plan_index(
        body,
        observed.spec,
        config_map=observed.found.get(("ConfigMap", corpus_map)),
        jobs=observed.index_jobs,
        result=observed.index_result,
    )
    status, persist, cost = _plan_status(observed, fleet, step, placement, memory, problems, index)
    return ReconcilePlan(
        memory=memory,
        announce=announce,
        counts=counts,
        engines=fleet.plan,
        drains=fleet.drains,
        creates=fleet.creates,
        deletes=fleet.deletes,
        index=index,
        report=_report_events(index, problems, old_status),
        gauges=EngineGauges(tuple(fleet.engines), step.decision.desired, observed.queued_tokens, cost),
        status=status if status_changed(old_status, status) else None,
        persist=persist,
        notes=list(fleet.plan.notes),
        wakes=fleet.wakes,
        sleeps=fleet.sleeps,
    )


@dataclass
class FleetPlan:
    """The pod changes that bring the engines to placement's target, and the
    engines as they will be after them."""

    spec_hash: str
    plan: EnginePlan
    standbys: StandbyPlan
    drains: list[DrainAction]
    creates: list[tuple[str, dict]]  # (what, pod or LeaderWorkerSet manifest)
    deletes: list[DeleteAction]
    wakes: list[WakeAction]
    sleeps: list[SleepAction]
    engines: list[Engine]


def _plan_fleet(observed: Observed, placement: Placement) -> FleetPlan:
    body, spec, now = observed.body, observed.spec, observed.now
    meta = body["metadata"]
    labels = (meta["namespace"], meta["name"])
    spec_hash = render.engine_spec_hash(spec)
    signals = {name: s for name, node in observed.nodes.items() if (s := node_signal(node, now)) is not None}
    engine_plan = plan_engines(
        observed.engines,
        target=placement.target,
        spec_hash=spec_hash,
        now=now,
        timing=drain_timing(spec),
        node_signals=signals,
        give_up=set(placement.give_up),
    )
    standbys = plan_standbys(
        observed.standbys,
        creates=engine_plan.create,
        # Standbys are single-node engines: none for engine groups over several nodes.
        want=render.standby_replicas(spec) if render.nodes_per_engine(spec) == 1 else 0,
        capacity=standby_capacity(spec),
        spec_hash=spec_hash,
        now=now,
        leaving_nodes=frozenset(name for name, signal in signals.items() if signal.action is Action.DRAIN),
    )
    engine_plan.create = standbys.cold  # a woken standby stands in for a cold start
    engine_plan.notes += standbys.notes
    drains = [_drain_action(drain, now, labels, observed.engines) for drain in engine_plan.drain]
    drains += _leaders_back_out(observed.engines, {d.name for d in engine_plan.drain})
    drains += _cache_reports(observed.engines)
    creates = [(capacity, render.engine_unit(body, spec, capacity)) for capacity in engine_plan.create]
    creates += [(f"{capacity} standby", render.standby_pod(body, spec, capacity)) for capacity in standbys.create]
    deletes = [_delete_action(name, observed.engines, now) for name in engine_plan.delete]
    deletes += [
        DeleteAction(name, Event("StandbyDeleted", f"deleted standby {name}: {why}")) for name, why in standbys.delete
    ]
    wakes, sleeps = _standby_actions(body, spec, standbys, now)
    engines = engines_after(observed.engines, engine_plan, spec_hash=spec_hash, now=now)
    engines += [
        Engine(w.name, w.capacity, spec_hash, serving=True, ready=True, failed=False, terminating=False, created=now)
        for w in standbys.wake
    ]
    return FleetPlan(spec_hash, engine_plan, standbys, drains, creates, deletes, wakes, sleeps, engines)


def _plan_status(
    observed: Observed,
    fleet: FleetPlan,
    step: ScalingStep,
    placement: Placement,
    memory: ScalingMemory,
    problems: list[str],
    index: IndexPlan,
) -> tuple[dict, bool, float | None]:
    """The status after this reconcile, whether it carries the scaling memory,
    and the fleet's cost per hour (None: no prices known)."""
    body, spec, now = observed.body, observed.spec, observed.now
    meta = body["metadata"]
    status = engines_status(
        fleet.engines,
        spec=spec,
        desired=step.decision.desired,
        spec_hash=fleet.spec_hash,
        problems=problems,
        index=index.state,
        rollout_note=next((n for n in fleet.plan.notes if n.startswith("rollout")), None),
        old_status=body.get("status") or {},
        generation=meta.get("generation"),
        endpoint=render.endpoint_url(body),
        now=now,
    )
    status, persist = _with_scaling(status, observed, step, placement, memory)
    if render.nodes_per_engine(spec) > 1:
        status["conditions"] = set_condition(
            status["conditions"],
            "GroupsSchedulable",
            *_groups_schedulable(fleet.engines, spec, observed.nodes),
            now=now,
            generation=meta.get("generation"),
        )
    # Standbys cost their GPUs while asleep: they count in the cost, not as engines.
    woken = {w.name for w in fleet.standbys.wake}
    asleep = [
        Engine(s.name, s.capacity, s.spec_hash, False, s.ready, s.failed, s.terminating, s.created, node=s.node)
        for s in observed.standbys
        if s.name not in woken
    ]
    cost = cost_per_hour(fleet.engines + asleep, spec)
    if render.standby_replicas(spec) or observed.standbys:
        status["standbyReplicas"] = sum(1 for s in asleep if s.ready and not s.terminating)
        if cost is not None:
            status["costPerHour"] = f"${cost:.2f}"
    return status, persist, cost


def _standby_actions(
    body: dict, spec: dict, standbys: StandbyPlan, now: datetime.datetime
) -> tuple[list[WakeAction], list[SleepAction]]:
    timeout = float((spec["model"].get("standby") or {}).get("wakeTimeoutSeconds", 30))
    into_serving = {
        "metadata": {
            "labels": {render.LABEL_SERVING: "true", render.LABEL_STANDBY: None},
            "annotations": {ANNOTATION_SLEEP_ASKED: None},
        }
    }
    wakes = [
        WakeAction(w.name, w.url, w.capacity, timeout, into_serving, render.engine_pod(body, spec, w.capacity))
        for w in standbys.wake
    ]
    asked = {"metadata": {"annotations": {ANNOTATION_SLEEP_ASKED: now_iso(now)}}}
    return wakes, [SleepAction(name, url, asked) for name, url in standbys.sleep]


def _with_scaling(
    status: dict, observed: Observed, step: ScalingStep, placement: Placement, memory: ScalingMemory
) -> tuple[dict, bool]:
    """Status with the autoscaler's part; and whether it carries the scaling memory."""
    decision = step.decision
    now, generation = observed.now, observed.body["metadata"].get("generation")
    queued = observed.queued_tokens
    status = status | {"queuedTokens": None if queued is None else int(round(queued))}
    status["conditions"] = set_condition(
        status["conditions"],
        "ScalingActive",
        queued is not None,
        decision.reason,
        decision.message,
        now=now,
        generation=generation,
    )
    status["conditions"] = set_condition(
        status["conditions"],
        SLO_REACHABLE,
        *_slo_reach(step, observed.spec),
        now=now,
        generation=generation,
    )
    if memory.autoscaler.last_scale_time is not None:
        last = datetime.datetime.fromtimestamp(memory.autoscaler.last_scale_time, datetime.UTC)
        status["lastScaleTime"] = now_iso(last)
    old_status = observed.body.get("status") or {}
    old_scaling = old_status.get("scaling") or {}
    persist = (
        decision.changed
        or placement.reason != old_scaling.get("placementReason")
        or now.timestamp() - memory.persisted_at >= PERSIST_EVERY
    )
    if persist:
        status["scaling"] = {
            "autoscaler": memory.autoscaler.to_dict(),
            "calibration": memory.calibration.to_dict(),
            "placement": memory.placement.to_dict(),
            "placementReason": placement.reason,
        }
        status["sizing"] = step.sizing_status()
    else:
        status["scaling"] = old_scaling
        if "sizing" in old_status:
            status["sizing"] = old_status["sizing"]
    return status, persist


def _slo_reach(step: ScalingStep, spec: dict) -> tuple[bool, str, str]:
    """The SLOReachable condition: False with the numbers when no engine can meet
    the TTFT SLO. The True messages hold no measured number, so they do not
    rewrite status every reconcile."""
    if step.slo_problem:
        return False, SLO_BELOW_PREFILL, step.slo_problem
    if spec["scaling"].get("targetQueuedTokensPerReplica") is not None:
        return True, "SizedOnTarget", "sized on targetQueuedTokensPerReplica, not on the SLO"
    ttft = f"{ScalingPolicy.from_spec(spec).slo.ttft_seconds:g}s"
    if step.calibration.mean_prompt_tokens is None:
        return True, "NoPromptSeen", f"no finished request yet to weigh one prefill against the TTFT SLO of {ttft}"
    percentile = f"{ScalingPolicy.from_spec(spec).slo.percentile:g}"
    return (
        True,
        "PrefillWithinSLO",
        f"one prefill of the p{percentile} prompt (or the mean, until enough requests finished) takes less than "
        f"the TTFT SLO of {ttft}",
    )


def _scale(observed: Observed, memory: ScalingMemory) -> tuple[ScalingStep, Placement, ScalingMemory]:
    """How many engines (calibrate → TTFT feedback → decide, as the simulator runs it), and where."""
    spec, now = observed.spec, observed.now.timestamp()
    live = [e for e in observed.engines if not e.terminating and not e.failed]
    work, samples = observed.work, list(observed.samples)
    observation = observation_from(
        work,
        samples,
        now=now,
        ready=sum(1 for e in live if e.serving and e.ready),
        starting=sum(1 for e in live if e.serving and not e.ready),
        draining=sum(1 for e in live if e.draining),
        metric_problem=observed.metric_problem,
    )
    step, autoscaler, calibration = scale(
        ScalingPolicy.from_spec(spec),
        observation,
        samples=samples,
        ttft_buckets=work.ttft_buckets if work else None,
        autoscaler=memory.autoscaler,
        calibration_state=memory.calibration,
    )
    decision = step.decision
    placement, placement_state = place(
        desired=decision.desired,
        baseline=spec["scaling"]["onDemandBaseline"],
        settings=SpotSettings.from_spec(spec),
        engines=[placement_view(e, observed.nodes) for e in live],
        state=memory.placement,
        now=now,
    )
    return step, placement, ScalingMemory(autoscaler, placement_state, memory.persisted_at, calibration)


def _scaling_events(
    step: ScalingStep, placement: Placement, old_status: dict, labels: tuple[str, str]
) -> tuple[list[Event], list[Count]]:
    decision = step.decision
    events, counts = [], []
    if step.slo_problem and _condition(old_status, SLO_REACHABLE).get("status") != "False":
        events.append(Event(SLO_BELOW_PREFILL, step.slo_problem, warning=True))
    if decision.changed:
        events.append(Event("Scaled", decision.message))
        direction = "up" if decision.desired > decision.previous else "down"
        counts.append(Count("scale_events", (*labels, direction)))
    if placement.reason != (old_status.get("scaling") or {}).get("placementReason"):
        events.append(Event(placement.reason, placement.message, warning=placement.reason == "SpotShort"))
    return events, counts


def _leaders_back_out(engines: list[Engine], draining_now: set[str]) -> list[DrainAction]:
    """A draining group whose pod went is recreated by its LeaderWorkerSet with
    a leader labelled serving from the template: take it out of the Service
    again (no new Events: the drain was announced)."""
    return [
        DrainAction(
            e.name,
            {"metadata": {"labels": {render.LABEL_SERVING: "false"}}},
            (),
            (),
            (("v1", "Pod", e.leader),),
        )
        for e in engines
        if e.group and e.draining and e.leader and e.leader_serving and not e.terminating and e.name not in draining_now
    ]


def _groups_schedulable(engines: list[Engine], spec: dict, nodes: dict[str, dict]) -> tuple[bool, str, str]:
    """Whether every engine group found its nodes; if not, which nodes would fit
    (`nodes`: every node of the cluster, as observe reads them for a stuck group)."""
    stuck = [e for e in engines if e.group and e.unschedulable and not e.terminating]
    if not stuck:
        return True, "NodesFound", ""
    wanted = render.nodes_per_engine(spec)
    parts = []
    for capacity in sorted({e.capacity for e in stuck}):
        fit = fitting_nodes(spec, capacity, nodes)
        parts.append(
            f"{capacity} nodes that would fit: {', '.join(fit) or 'none'} ({len(fit)} of the {wanted} a group needs)"
        )
    return (
        False,
        "NoNodesForGroup",
        f"{', '.join(e.name for e in stuck)}: {group_fit(spec)}; {'; '.join(parts)}; "
        f"the scheduler says: {stuck[0].unschedulable}",
    )


def group_fit(spec: dict) -> str:
    """The nodes one engine group needs, in words."""
    gpu = spec["gpu"]
    nodes = render.nodes_per_engine(spec)
    where = [f"of instance type {' or '.join(gpu['instanceTypes'])}"] if gpu.get("instanceTypes") else []
    where += [f"labelled {k}={v}" for k, v in sorted((gpu.get("nodeSelector") or {}).items())]
    capacity = "spot or on-demand" if gpu["mixedCapacityGroups"] else "all spot or all on-demand"
    return (
        f"an engine group needs {nodes} nodes at once, {capacity}, each with {render.gpu_count(spec)} free "
        f"{gpu['resourceName']}{(' ' + ', '.join(where)) if where else ''}"
    )


def _drain_action(
    drain: Drain, now: datetime.datetime, labels: tuple[str, str], engines: list[Engine] | None = None
) -> DrainAction:
    annotations = {
        ANNOTATION_DRAIN_SINCE: now_iso(now),
        ANNOTATION_DRAIN_REASON: drain.reason,
        ANNOTATION_DRAIN_DEADLINE: now_iso(drain.deadline),
    }
    patch = {"metadata": {"labels": {render.LABEL_SERVING: "false"}, "annotations": annotations}}
    cause = "interruption" if drain.interruption else drain.reason.split(":")[0]
    counts = [Count("drains", (*labels, cause))]
    events = []
    if drain.interruption is not None:
        counts.append(Count("interruptions", (*labels, drain.interruption.source)))
        if drain.interruption.warning:
            events.append(Event("InterruptionTimeUnparseable", drain.interruption.warning, warning=True))
        events.append(
            Event(
                "EngineInterrupted",
                f"{drain.name}: {drain.reason}; out of serving, replacement started, deleted by {now_iso(drain.deadline)} at the latest",
                warning=True,
            )
        )
    else:
        events.append(Event("EngineDraining", f"{drain.name}: {drain.reason}"))
    engine = next((e for e in engines or [] if e.name == drain.name), None)
    if engine is not None and engine.group:
        targets = ((render.LWS_API_VERSION, render.LWS_KIND, engine.name),)
        targets += (("v1", "Pod", engine.leader),) if engine.leader else ()
    else:
        targets = (("v1", "Pod", drain.name),)
    return DrainAction(drain.name, patch, tuple(events), tuple(counts), targets)


def _cache_reports(engines: list[Engine]) -> list[DrainAction]:
    """An engine whose node model cache was unusable: said once (the pod is
    annotated with the Event), as why that engine loaded slowly."""
    return [
        DrainAction(
            engine.name,
            {"metadata": {"annotations": {ANNOTATION_CACHE_REPORTED: "true"}}},
            (
                Event(
                    "ModelCacheUnusable",
                    f"{engine.name} started without the node's model cache: {engine.cache_problem}",
                    warning=True,
                ),
            ),
            (),
        )
        for engine in engines
        if engine.cache_problem and not engine.terminating
    ]


def _delete_action(name: str, engines: list[Engine], now: datetime.datetime) -> DeleteAction:
    engine = next((e for e in engines if e.name == name), None)
    took = (
        f" after draining {int((now - engine.drain_since).total_seconds())}s" if engine and engine.drain_since else ""
    )
    idle = " (idle)" if engine and engine.running_requests == 0 else ""
    if engine is not None and engine.group:
        event = Event("EngineDeleted", f"deleted engine group {name}{took}{idle}, all its pods with it")
        return DeleteAction(name, event, render.LWS_API_VERSION, render.LWS_KIND)
    return DeleteAction(name, Event("EngineDeleted", f"deleted {name}{took}{idle}"))


def created_event(created: list[tuple[str, str]]) -> Event:
    """`created`: (pod name as the API named it, capacity) of each new engine."""
    return Event("EnginesCreated", "created " + ", ".join(f"{name} ({capacity})" for name, capacity in created))


def engines_after(engines: list[Engine], plan: EnginePlan, *, spec_hash: str, now: datetime.datetime) -> list[Engine]:
    """The engines as they will be once the plan is written: status and
    metrics describe the outcome of this reconcile, not what it started from."""
    drained = {d.name: d for d in plan.drain}
    deleted = set(plan.delete)
    after = []
    for engine in engines:
        if engine.name in deleted:
            engine = dataclasses.replace(engine, terminating=True)
        elif engine.name in drained:
            engine = dataclasses.replace(
                engine, serving=False, drain_since=now, drain_deadline=drained[engine.name].deadline
            )
        after.append(engine)
    for number, capacity in enumerate(plan.create):
        after.append(
            Engine(
                name=f"<new {number}>",
                capacity=capacity,
                spec_hash=spec_hash,
                serving=True,
                ready=False,
                failed=False,
                terminating=False,
                created=now,
            )
        )
    return after


def _report_events(index: IndexPlan, problems: list[str], old_status: dict) -> list[Event]:
    events = []
    state = index.state
    if state.reason != _condition(old_status, "IndexReady").get("reason"):
        events.append(
            Event(f"Index{state.reason}", state.message, warning=state.ready is False and state.reason != "Building")
        )
    if problems and _condition(old_status, "Degraded").get("message") != "; ".join(problems):
        events.append(Event("InvalidConfiguration", "; ".join(problems), warning=True))
    return events
