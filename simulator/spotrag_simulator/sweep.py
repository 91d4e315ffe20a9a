"""Equal-cost comparison: sweep each autoscaler's own knob, read the curves at the same cost.

One default point per policy compares policies of different cost, which says
nothing about which is better. Here each policy runs at several settings of
the knob its users would turn (spotrag: `slo.targetUtilization`; KubeAI:
`targetRequests`; KEDA: the waiting-requests threshold) on the same trace,
spot interruptions and start, giving a cost → minutes-in-SLO curve per
policy. `at_cost` then reads a curve at another policy's cost by linear
interpolation between the two sweep points that bracket it (None outside the
sweep: not reachable with the settings tried). Each policy also runs with spot
off (run.NO_SPOT): on-demand prices are read against on-demand prices.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from dataclasses import dataclass

from .presets import Profile
from .report import Summary, summarize
from .run import (
    KEDA,
    KEDA_NO_SPOT,
    KUBEAI,
    KUBEAI_NO_SPOT,
    NO_SPOT,
    PEAK,
    SPOTRAG,
    SPOTRAG_NO_SPOT,
    controller_for,
    draw_outages,
    peak_fleet,
    sized,
)
from .sim import Simulation
from .trace import TraceRequest

# The knob swept per policy, and its settings. KubeAI's targetRequests is an
# integer in its CRD, so its sweep is whole numbers, given per trace.
KNOBS = {
    SPOTRAG: "slo.targetUtilization",
    SPOTRAG_NO_SPOT: "slo.targetUtilization",
    KUBEAI: "targetRequests",
    KUBEAI_NO_SPOT: "targetRequests",
    KEDA: "waitingThreshold",
    KEDA_NO_SPOT: "waitingThreshold",
}


def with_knob(profile: Profile, policy: str, value: float) -> Profile:
    """The profile with `policy`'s knob set to `value` (the other policies' settings untouched)."""
    base = NO_SPOT.get(policy, policy)  # spot on or off, the same knob
    if base == SPOTRAG:
        slo = {**(profile.spec["scaling"].get("slo") or {}), "targetUtilization": value}
        return dataclasses.replace(profile.with_scaling(slo=slo), utilization_set=True)
    if base == KUBEAI:
        return dataclasses.replace(profile, kubeai=dataclasses.replace(profile.kubeai, target_requests=value))
    if base == KEDA:
        return dataclasses.replace(profile, keda=dataclasses.replace(profile.keda, waiting_threshold=value))
    raise ValueError(f"no knob to sweep for {policy!r} (known: {', '.join(KNOBS)})")


@dataclass(frozen=True)
class Point:
    """One policy at one knob setting."""

    policy: str
    value: float
    cost_vs_peak: float
    slo_minutes: float  # after warm-up
    lost: int  # after warm-up
    warmup_lost: int
    scale_changes: int


@dataclass(frozen=True)
class AtCost:
    """A curve read at a cost: interpolated between the points at `between`."""

    slo_minutes: float
    lost: float
    between: tuple[float, float]  # the knob values of the bracketing points


def at_cost(points: list[Point], cost: float) -> AtCost | None:
    """The minutes in SLO and lost requests `points` (one policy's sweep) give at
    `cost`, linearly interpolated between the two points of nearest cost below
    and above it; None when the sweep does not reach that cost."""
    ordered = sorted(points, key=lambda p: p.cost_vs_peak)
    for low, high in zip(ordered, ordered[1:], strict=False):
        if low.cost_vs_peak <= cost <= high.cost_vs_peak:
            span = high.cost_vs_peak - low.cost_vs_peak
            share = (cost - low.cost_vs_peak) / span if span else 0.0
            return AtCost(
                slo_minutes=low.slo_minutes + share * (high.slo_minutes - low.slo_minutes),
                lost=low.lost + share * (high.lost - low.lost),
                between=(low.value, high.value),
            )
    if len(ordered) == 1 and ordered[0].cost_vs_peak == cost:
        only = ordered[0]
        return AtCost(slo_minutes=only.slo_minutes, lost=only.lost, between=(only.value, only.value))
    return None


# What the worker processes read (set before the pool forks, so the trace is not pickled per task).
_WORK: dict = {}


def _simulate(task: tuple[str, float]) -> tuple[str, float, Summary]:
    policy, value = task
    profile = _WORK["profile"] if policy == PEAK else with_knob(_WORK["profile"], policy, value)
    controller = controller_for(policy, profile, peak=_WORK["peak"], start=_WORK["start"])
    result = Simulation(
        profile, _WORK["trace"], controller, seed=_WORK["seed"], horizon=_WORK["horizon"], outages=_WORK["outages"]
    ).run()
    return policy, value, summarize(result, profile)


def sweep(
    profile: Profile,
    trace: list[TraceRequest],
    settings: dict[str, tuple[float, ...]],
    *,
    seed: int,
    horizon: float,
    processes: int = 1,
) -> tuple[list[Point], dict]:
    """Run every (policy, knob value) in `settings` on the same trace, outages and
    start as `run.compare`; costs relative to the searched on-demand-for-peak
    fleet. Returns the points and what was held fixed."""
    peak, _, meets = peak_fleet(profile, trace, horizon, seed=seed)
    profile = sized(profile, trace, peak)
    _WORK.update(
        profile=profile,
        trace=trace,
        peak=peak,
        start=profile.scaling_policy().floor,
        seed=seed,
        horizon=horizon,
        outages=draw_outages(profile, seed=seed, horizon=horizon),
    )
    tasks = [(PEAK, 0.0)] + [(policy, value) for policy, values in settings.items() for value in values]
    try:
        if processes > 1:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                done = pool.map(_simulate, tasks, chunksize=1)
        else:
            done = [_simulate(task) for task in tasks]
    finally:
        _WORK.clear()
    reference = done[0][2].cost
    points = [
        Point(
            policy=policy,
            value=value,
            cost_vs_peak=s.cost / reference,
            slo_minutes=s.steady_slo_minutes,
            lost=s.steady_lost,
            warmup_lost=s.warmup_lost,
            scale_changes=s.scale_changes,
        )
        for policy, value, s in done[1:]
    ]
    meta = {"peak_engines": peak, "peak_fleet_meets_slo": meets, "max_replicas": profile.spec["scaling"]["maxReplicas"]}
    return points, meta


def curves_table(points: list[Point]) -> str:
    """Every sweep point, one row each (Markdown)."""
    lines = [
        "| policy | knob = value | × on-demand peak | minutes in SLO after warm-up | lost after warm-up | scale changes |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.policy, p.value)):
        lines.append(
            f"| {p.policy} | {KNOBS[p.policy]} = {p.value:g} | {p.cost_vs_peak:.3f} | {p.slo_minutes:.2%} | "
            f"{p.lost} | {p.scale_changes} |"
        )
    return "\n".join(lines)


def equal_cost_table(points: list[Point], references: tuple[str, ...], against: tuple[str, ...]) -> str:
    """For each point of the `references` policies, what each of `against` gives at the same cost (Markdown)."""
    header = "| policy at | × peak | minutes in SLO / lost | " + " | ".join(
        f"{name} at that cost: minutes in SLO / lost (between {KNOBS[name]})" for name in against
    )
    lines = [header + " |", "|" + "---|" * (3 + len(against))]
    for name in references:
        for p in sorted((p for p in points if p.policy == name), key=lambda p: p.value):
            cells = []
            for other in against:
                found = at_cost([q for q in points if q.policy == other], p.cost_vs_peak)
                cells.append(
                    "not reachable in the sweep"
                    if found is None
                    else f"{found.slo_minutes:.2%} / {found.lost:.0f} ({found.between[0]:g}–{found.between[1]:g})"
                )
            lines.append(
                f"| {name} {KNOBS[name].split('.')[-1]} {p.value:g} | {p.cost_vs_peak:.3f} | "
                f"{p.slo_minutes:.2%} / {p.lost} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)
