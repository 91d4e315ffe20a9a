"""What to do with engine pods, decided without touching the cluster.

observe (pods as the API lists them) → plan (this module, pure) → execute
(the operator's handlers). The plan is tested on constructed pod lists.

Rules:
- Desired engines split into an on-demand baseline and spot for the rest
  (all on-demand when spot is off).
- A spec change rolls by hash: new pods first; old pods keep serving until
  as many new ones are Ready as are desired, then they are drained.
- A failed or vanished pod is replaced; an excess pod is drained (not-ready
  first, then the youngest), never deleted while it still serves.
- Draining = out of the serving set first (label), deleted only after
  `drain_grace` seconds, so every gateway has seen it leave.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from . import render

ANNOTATION_DRAIN_SINCE = "spotrag.io/drain-since"
ANNOTATION_DRAIN_REASON = "spotrag.io/drain-reason"


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
    node: str | None = None

    @classmethod
    def from_pod(cls, pod: dict) -> "Engine":
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        return cls(
            name=meta["name"],
            capacity=labels.get(render.LABEL_CAPACITY, render.SPOT),
            spec_hash=labels.get(render.LABEL_SPEC_HASH, ""),
            serving=labels.get(render.LABEL_SERVING) == "true",
            ready=conditions.get("Ready") == "True",
            failed=status.get("phase") in ("Failed", "Succeeded"),
            terminating=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")) or datetime.datetime.min.replace(tzinfo=datetime.UTC),
            drain_since=parse_time(annotations.get(ANNOTATION_DRAIN_SINCE)),
            node=(pod.get("spec") or {}).get("nodeName"),
        )

    @property
    def draining(self) -> bool:
        return not self.serving


@dataclass(frozen=True)
class Drain:
    name: str
    reason: str


@dataclass
class EnginePlan:
    create: list[str] = field(default_factory=list)  # one capacity type per new pod
    drain: list[Drain] = field(default_factory=list)  # take out of serving
    delete: list[str] = field(default_factory=list)  # pod names
    notes: list[str] = field(default_factory=list)  # why, for logs and Events

    @property
    def empty(self) -> bool:
        return not (self.create or self.drain or self.delete)


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


def _victim_order(engine: Engine) -> tuple:
    # Not-ready engines cost nothing to lose; among ready ones the youngest
    # has the coldest caches.
    return (engine.ready, -engine.created.timestamp())


def plan_engines(
    engines: list[Engine],
    *,
    desired: int,
    baseline: int,
    spot_enabled: bool,
    spec_hash: str,
    now: datetime.datetime,
    drain_grace: float,
) -> EnginePlan:
    plan = EnginePlan()
    live = [e for e in engines if not e.terminating]

    # Failed pods never come back on their own: delete, and replace below.
    for engine in live:
        if engine.failed:
            plan.delete.append(engine.name)
            plan.notes.append(f"engine {engine.name} failed; replacing it")
    live = [e for e in live if not e.failed]

    # Draining engines are deleted once every gateway has had time to stop
    # routing to them (their own shutdown timeout then finishes the rest).
    for engine in live:
        if engine.draining and engine.drain_since is not None:
            if (now - engine.drain_since).total_seconds() >= drain_grace:
                plan.delete.append(engine.name)
        elif engine.draining:
            # Out of serving without a start time (label flipped by hand): start the clock now.
            plan.drain.append(Drain(engine.name, "not serving"))
    serving = [e for e in live if e.serving]

    target = capacity_split(desired, baseline, spot_enabled)
    current = [e for e in serving if e.spec_hash == spec_hash]
    outdated = [e for e in serving if e.spec_hash != spec_hash]

    excess: list[tuple[Engine, str]] = []
    for capacity, want in target.items():
        have = sorted((e for e in current if e.capacity == capacity), key=_victim_order)
        if len(have) < want:
            plan.create += [capacity] * (want - len(have))
        excess += [(victim, f"scale-in: {capacity} engines above {want}") for victim in have[: max(0, len(have) - want)]]

    # A ready engine leaves only while enough other ready engines remain, so
    # moving engines between capacity types never opens a gap.
    ready_left = sum(1 for e in current if e.ready)
    for victim, reason in sorted(excess, key=lambda pair: _victim_order(pair[0])):
        if not victim.ready:
            plan.drain.append(Drain(victim.name, reason))
        elif ready_left - 1 >= desired:
            plan.drain.append(Drain(victim.name, reason))
            ready_left -= 1
        else:
            plan.notes.append(f"keeping {victim.name} until its replacement is ready")

    # Rollout: old engines leave only when the new ones can carry the load.
    ready_current = sum(1 for e in current if e.ready)
    if outdated and ready_current >= desired:
        for engine in outdated:
            plan.drain.append(Drain(engine.name, "rollout: replaced by engines of the new spec"))
    elif outdated:
        plan.notes.append(f"rollout: {ready_current}/{desired} new engines ready, {len(outdated)} old still serving")
    return plan
