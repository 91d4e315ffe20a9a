"""The RAGDeployment's status, computed from what was observed (pure)."""

from __future__ import annotations

import datetime

from . import render
from .index_job import IndexState
from .plan import Engine

SCALED_TO_ZERO = "ScaledToZero"
CONDITION_TYPES = (
    "Ready",
    "Progressing",
    "Degraded",
    "IndexReady",
    "ScalingActive",
    "GroupsSchedulable",
    "SLOReachable",
)


def now_iso(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    *,
    now: datetime.datetime,
    generation: int | None,
) -> list[dict]:
    """Conditions as Kubernetes keeps them: lastTransitionTime moves only when
    the status does."""
    value = "Unknown" if status is None else "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == value and previous.get("lastTransitionTime")
        else now_iso(now)
    )
    updated = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": transition}
    if generation is not None:
        updated["observedGeneration"] = generation
    others = [c for c in conditions if c.get("type") != type_]
    return sorted(
        others + [updated], key=lambda c: CONDITION_TYPES.index(c["type"]) if c["type"] in CONDITION_TYPES else 99
    )


def cost_per_hour(engines: list[Engine], spec: dict) -> float | None:
    """Engines on a node cost their GPUs' price per hour; None without prices."""
    pricing = spec.get("pricing") or {}
    prices = {render.ON_DEMAND: pricing.get("onDemandPerGpuHour"), render.SPOT: pricing.get("spotPerGpuHour")}
    if all(p is None for p in prices.values()):
        return None
    gpus = render.gpu_count(spec) * render.nodes_per_engine(spec)
    return sum((prices[e.capacity] or 0.0) * gpus for e in engines if not e.terminating and e.node)


def engines_status(
    engines: list[Engine],
    *,
    spec: dict,
    desired: int,
    spec_hash: str,
    problems: list[str],
    index: IndexState,
    rollout_note: str | None,
    old_status: dict,
    generation: int | None,
    endpoint: str,
    now: datetime.datetime,
) -> dict:
    live = [e for e in engines if not e.terminating and not e.failed]
    serving = [e for e in live if e.serving]
    ready = [e for e in serving if e.ready]
    by_capacity = lambda pool, cap: sum(1 for e in pool if e.capacity == cap)  # noqa: E731
    status: dict = {
        "observedGeneration": generation,
        "engines": f"{len(ready)}/{desired}",
        "desiredReplicas": desired,
        "readyReplicas": len(ready),
        "spotReplicas": by_capacity(serving, render.SPOT),
        "onDemandReplicas": by_capacity(serving, render.ON_DEMAND),
        "readySpotReplicas": by_capacity(ready, render.SPOT),
        "readyOnDemandReplicas": by_capacity(ready, render.ON_DEMAND),
        "drainingReplicas": sum(1 for e in live if e.draining),
        "endpoint": endpoint,
        "engineSpecHash": spec_hash,
    }
    if (cost := cost_per_hour(live, spec)) is not None:
        status["costPerHour"] = f"${cost:.2f}"
    conditions = list(old_status.get("conditions") or [])
    rolled = all(e.spec_hash == spec_hash for e in serving)
    is_ready = len(ready) >= desired and not problems and index.ready is not False
    if problems:
        conditions = set_condition(
            conditions, "Degraded", True, "InvalidConfiguration", "; ".join(problems), now=now, generation=generation
        )
    else:
        conditions = set_condition(conditions, "Degraded", False, "AsExpected", "", now=now, generation=generation)
    if desired == 0 and not serving and not problems:
        # Scaled to zero (minReplicas 0, idle): ready to answer; the next request starts an engine.
        conditions = set_condition(
            conditions,
            "Ready",
            True,
            SCALED_TO_ZERO,
            "no engine runs while idle; the gateways hold the next request while one starts",
            now=now,
            generation=generation,
        )
    elif is_ready:
        conditions = set_condition(
            conditions,
            "Ready",
            True,
            "EnginesReady",
            f"{len(ready)} of {desired} engines ready",
            now=now,
            generation=generation,
        )
    else:
        reason = "Degraded" if problems else "EnginesStarting" if len(ready) < desired else "IndexNotReady"
        conditions = set_condition(
            conditions,
            "Ready",
            False,
            reason,
            f"{len(ready)} of {desired} engines ready",
            now=now,
            generation=generation,
        )
    conditions = set_condition(
        conditions, "IndexReady", index.ready, index.reason, index.message, now=now, generation=generation
    )
    if index.status:
        status["index"] = index.status
    progressing = not rolled or len(serving) != desired or len(ready) < desired
    message = rollout_note or (
        "rolling out a new engine spec" if not rolled else f"{len(serving)} engines serving, {desired} desired"
    )
    conditions = set_condition(
        conditions,
        "Progressing",
        progressing,
        "RollingOut" if not rolled else "Scaling" if progressing else "Stable",
        message if progressing else "",
        now=now,
        generation=generation,
    )
    status["conditions"] = conditions
    return status


def status_changed(old: dict, new: dict) -> bool:
    """True when writing `new` would change what the status says (transition
    times of unchanged conditions are kept by set_condition, so equal is equal)."""
    return any(old.get(key) != value for key, value in new.items())
