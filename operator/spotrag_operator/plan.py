"""What to do with engine pods, decided without touching the cluster.

observe (pods, their nodes' signals, draining engines' load) → plan (this
module, pure) → execute (the operator's handlers). The plan is tested on
constructed histories.

The drain, per engine, keeps its state on the pod (label + annotations), so
an operator restart mid-drain picks it up where it was:

  serving ──(scale-in, rollout, interruption, cordon)──► draining
     label spotrag.io/serving=false: out of the Service and every gateway's
     list; annotations: since, reason, deadline. A replacement is planned at
     once, because the serving count dropped.
  draining ──(no running requests, or the deadline)──► deleted
     never before `drain_grace` (gateways must have seen it leave); vLLM's
     --shutdown-timeout then finishes what still runs, and the gateway
     resumes any stream cut short on another engine.

Rules for the rest:
- Desired engines split into an on-demand baseline and spot for the rest.
- A spec change rolls by hash: new pods first; old ones keep serving until
  as many new ones are Ready as are desired.
- A ready engine leaves for scale-in or a capacity move only while enough
  other ready engines remain; an interrupted node's engines leave at once.
- A rebalance recommendation (pre-warm) adds a replacement per engine at
  risk without draining; scale-in later prefers the engines at risk.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from spotrag_runtime.model_cache import UNUSABLE as UNUSABLE_CACHE

from . import render
from .signals import Action, NodeSignal

ANNOTATION_DRAIN_SINCE = "spotrag.io/drain-since"
ANNOTATION_DRAIN_REASON = "spotrag.io/drain-reason"
ANNOTATION_DRAIN_DEADLINE = "spotrag.io/drain-deadline"
# Set once the operator has said (an Event) that this engine's node model cache was unusable.
ANNOTATION_CACHE_REPORTED = "spotrag.io/model-cache-reported"


def pod_facts(pod: dict) -> dict[str, Any]:
    """What every engine-like pod (an engine, a standby) says of itself: name,
    capacity, spec hash, ready, failed, terminating, created, node."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return {
        "name": meta["name"],
        "capacity": labels.get(render.LABEL_CAPACITY, render.SPOT),
        "spec_hash": labels.get(render.LABEL_SPEC_HASH, ""),
        "ready": conditions.get("Ready") == "True",
        "failed": status.get("phase") in ("Failed", "Succeeded"),
        "terminating": bool(meta.get("deletionTimestamp")),
        "created": parse_time(meta.get("creationTimestamp")) or datetime.datetime.min.replace(tzinfo=datetime.UTC),
        "node": (pod.get("spec") or {}).get("nodeName"),
    }


@dataclass(frozen=True)
class Engine:
    """The few facts about an engine pod that planning needs."""

    name: str
    capacity: str
    spec_hash: str
    serving: bool
    ready: bool
    failed: bool
    terminating: bool
    created: datetime.datetime
    drain_since: datetime.datetime | None = None
    drain_deadline: datetime.datetime | None = None
    node: str | None = None
    running_requests: int | None = None  # from the engine's /metrics, for draining engines; None: unknown
    cache_problem: str | None = None  # its node model cache was unusable and that is not yet reported
    # An engine group over several nodes (a LeaderWorkerSet named `name`): its
    # leader pod (None until created), every node the group's pods are on, and
    # why a pod of it cannot be scheduled.
    group: bool = False
    leader: str | None = None
    group_nodes: tuple[str, ...] = ()
    unschedulable: str | None = None
    leader_serving: bool = False  # the leader pod's own serving label (a recreated group's leader has it anew)

    @classmethod
    def from_pod(cls, pod: dict, running_requests: int | None = None) -> Engine:
        meta = pod["metadata"]
        annotations = meta.get("annotations") or {}
        return cls(
            **pod_facts(pod),
            serving=(meta.get("labels") or {}).get(render.LABEL_SERVING) == "true",
            drain_since=parse_time(annotations.get(ANNOTATION_DRAIN_SINCE)),
            drain_deadline=parse_time(annotations.get(ANNOTATION_DRAIN_DEADLINE)),
            running_requests=running_requests,
            cache_problem=None if ANNOTATION_CACHE_REPORTED in annotations else unusable_cache(pod.get("status") or {}),
        )

    @classmethod
    def from_group(cls, lws: dict, pods: list[dict], running_requests: int | None = None) -> Engine:
        """An engine group: its record (capacity, serving, drain) is the
        LeaderWorkerSet's, its readiness that of all its pods together."""
        meta = lws["metadata"]
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        size = int(((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size") or 1)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        leader = next(
            (p for p in live if (p["metadata"].get("labels") or {}).get(render.LWS_WORKER_INDEX_LABEL) == "0"), None
        )
        ready = len(live) >= size and all(_pod_ready(p) for p in live)
        unschedulable = next(
            (
                c.get("message") or c.get("reason") or "Unschedulable"
                for p in live
                for c in (p.get("status") or {}).get("conditions") or []
                if c.get("type") == "PodScheduled" and c.get("status") == "False"
            ),
            None,
        )
        return cls(
            name=meta["name"],
            capacity=labels.get(render.LABEL_CAPACITY, render.SPOT),
            spec_hash=labels.get(render.LABEL_SPEC_HASH, ""),
            serving=labels.get(render.LABEL_SERVING) == "true",
            ready=ready,
            failed=False,  # the LeaderWorkerSet recreates a group whose pod failed
            terminating=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")) or datetime.datetime.min.replace(tzinfo=datetime.UTC),
            drain_since=parse_time(annotations.get(ANNOTATION_DRAIN_SINCE)),
            drain_deadline=parse_time(annotations.get(ANNOTATION_DRAIN_DEADLINE)),
            node=((leader or {}).get("spec") or {}).get("nodeName"),
            running_requests=running_requests,
            group=True,
            leader=leader["metadata"]["name"] if leader else None,
            group_nodes=tuple(sorted({n for p in live if (n := (p.get("spec") or {}).get("nodeName"))})),
            unschedulable=unschedulable,
            leader_serving=bool(leader)
            and (leader["metadata"].get("labels") or {}).get(render.LABEL_SERVING) == "true",
        )

    @property
    def draining(self) -> bool:
        return not self.serving

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the engine runs on: its own, or each of its group's."""
        return tuple(dict.fromkeys(n for n in (self.node, *self.group_nodes) if n))


def _pod_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def unusable_cache(pod_status: dict) -> str | None:
    """Why the engine's init container passed over the node model cache (its
    termination message, runtime/spotrag_runtime/model_cache), or None."""
    for init in pod_status.get("initContainerStatuses") or []:
        if init.get("name") != render.CACHE_INIT_CONTAINER:
            continue
        message = ((init.get("state") or {}).get("terminated") or {}).get("message") or ""
        if message.startswith(UNUSABLE_CACHE):
            return message.strip()
    return None


@dataclass(frozen=True)
class Drain:
    name: str
    reason: str
    deadline: datetime.datetime
    interruption: NodeSignal | None = None


@dataclass
class EnginePlan:
    create: list[str] = field(default_factory=list)  # one capacity type per new pod
    drain: list[Drain] = field(default_factory=list)  # take out of serving
    delete: list[str] = field(default_factory=list)  # pod names
    notes: list[str] = field(default_factory=list)  # why, for logs and Events

    @property
    def empty(self) -> bool:
        return not (self.create or self.drain or self.delete)


@dataclass(frozen=True)
class DrainTiming:
    grace: float  # seconds out of serving before deletion, at least
    timeout: float  # longest wait for running requests when there is no node deadline
    margin: float  # delete this long before a node's deadline, so the engine's own shutdown fits


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def capacity_split(desired: int, baseline: int, spot_enabled: bool) -> dict[str, int]:
    on_demand = desired if not spot_enabled else min(baseline, desired)
    return {render.ON_DEMAND: on_demand, render.SPOT: desired - on_demand}


def _seconds(delta: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=delta)


def plan_engines(
    engines: list[Engine],
    *,
    target: dict[str, int],
    spec_hash: str,
    now: datetime.datetime,
    timing: DrainTiming,
    node_signals: dict[str, NodeSignal] | None = None,
    give_up: set[str] | None = None,
) -> EnginePlan:
    """`target`: wanted engines per capacity type (capacity_split or
    placement); `give_up`: Pending spot engines placement replaces with
    on-demand ones, drained first."""
    plan = EnginePlan()
    node_signals = node_signals or {}
    desired = sum(target.values())
    live = [e for e in engines if not e.terminating]

    def signal_of(engine: Engine) -> NodeSignal | None:
        """The signal of the engine's node; for a group, of any of its nodes
        (a notice for one node takes the whole group), a drain before a pre-warm."""
        found = [s for node in engine.nodes if (s := node_signals.get(node)) is not None]
        return min(found, key=lambda s: s.action is not Action.DRAIN, default=None)

    # Failed pods never come back on their own: delete, and replace below.
    for engine in live:
        if engine.failed:
            plan.delete.append(engine.name)
            plan.notes.append(f"engine {engine.name} failed; replacing it")
    live = [e for e in live if not e.failed]

    # Draining engines go once idle or at their deadline, never before the grace.
    for engine in live:
        if not engine.draining:
            continue
        if engine.drain_since is None:
            # Out of serving without a drain record (label flipped by hand): start one.
            plan.drain.append(Drain(engine.name, "not serving", now + _seconds(timing.timeout)))
            continue
        graced = now - engine.drain_since >= _seconds(timing.grace)
        idle = engine.running_requests == 0
        overdue = engine.drain_deadline is not None and now >= engine.drain_deadline
        if graced and (idle or overdue):
            plan.delete.append(engine.name)

    # Interrupted or cordoned nodes: their engines leave serving now.
    serving: list[Engine] = []
    for engine in (e for e in live if e.serving):
        if engine.name in (give_up or ()):
            plan.drain.append(
                Drain(engine.name, "spot short: pending past spot.fallbackAfterSeconds, replaced on on-demand", now)
            )
            continue
        signal = signal_of(engine)
        if signal is not None and signal.action is Action.DRAIN:
            # With a node deadline, running answers get all the time the node has left.
            deadline = (
                now + _seconds(timing.timeout) if signal.deadline is None else signal.deadline - _seconds(timing.margin)
            )
            plan.drain.append(Drain(engine.name, f"interruption: {signal.describe()}", max(deadline, now), signal))
        else:
            serving.append(engine)

    # A rebalance recommendation: one replacement per engine at risk, kept serving.
    at_risk = {e.name for e in serving if (s := signal_of(e)) is not None and s.action is Action.PREWARM}
    current = [e for e in serving if e.spec_hash == spec_hash]
    outdated = [e for e in serving if e.spec_hash != spec_hash]

    def victim_order(engine: Engine) -> tuple:
        # Not-ready engines cost nothing to lose; then those at risk; among
        # the rest the youngest has the coldest caches.
        return (engine.ready, engine.name not in at_risk, -engine.created.timestamp())

    excess: list[tuple[Engine, str]] = []
    for capacity, want in target.items():
        have = sorted((e for e in current if e.capacity == capacity), key=victim_order)
        want_here = want + sum(1 for e in have if e.name in at_risk)
        if len(have) < want_here:
            plan.create += [capacity] * (want_here - len(have))
        excess += [
            (victim, f"scale-in: {capacity} engines above {want}") for victim in have[: max(0, len(have) - want_here)]
        ]

    ready_left = sum(1 for e in current if e.ready)
    for victim, reason in sorted(excess, key=lambda pair: victim_order(pair[0])):
        if not victim.ready:
            plan.drain.append(Drain(victim.name, reason, now + _seconds(timing.timeout)))
        elif ready_left - 1 >= desired:
            plan.drain.append(Drain(victim.name, reason, now + _seconds(timing.timeout)))
            ready_left -= 1
        else:
            plan.notes.append(f"keeping {victim.name} until its replacement is ready")

    # Rollout: old engines leave only when the new ones can carry the load.
    ready_current = sum(1 for e in current if e.ready)
    if outdated and ready_current >= desired:
        for engine in outdated:
            plan.drain.append(
                Drain(engine.name, "rollout: replaced by engines of the new spec", now + _seconds(timing.timeout))
            )
    elif outdated:
        plan.notes.append(f"rollout: {ready_current}/{desired} new engines ready, {len(outdated)} old still serving")
    return plan
