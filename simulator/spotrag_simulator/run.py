"""Run every policy on the same trace and world, and compare them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .policies import FixedController, KedaController, KubeAIController, SpotragController
from .presets import Profile
from .report import Summary, minute_percentiles, summarize
from .sim import RunResult, Simulation
from .sizing import TARGET_UTILIZATION, engine_seconds_per_request, peak_engines, suggested_targets
from .trace import TraceRequest, check_fits

PEAK = "on-demand-peak"
KUBEAI = "kubeai-requests"
KEDA = "keda-waiting"
SPOTRAG_NO_SPOT = "spotrag-no-spot"
SPOTRAG = "spotrag"
POLICIES = (PEAK, KUBEAI, KEDA, SPOTRAG_NO_SPOT, SPOTRAG)  # the default comparison
# Each autoscaler with spot turned off (spec spot.enabled false): on-demand
# capacity only, for comparisons at on-demand prices. spotrag's is in the default.
KUBEAI_NO_SPOT = "kubeai-requests-no-spot"
KEDA_NO_SPOT = "keda-waiting-no-spot"
NO_SPOT = {SPOTRAG_NO_SPOT: SPOTRAG, KUBEAI_NO_SPOT: KUBEAI, KEDA_NO_SPOT: KEDA}
KNOWN = (*POLICIES, KUBEAI_NO_SPOT, KEDA_NO_SPOT)


@dataclass
class Comparison:
    summaries: list[Summary]
    results: dict[str, RunResult]
    meta: dict
    profile: Profile  # as simulated, with what the simulator sized filled in


def draw_outages(profile: Profile, *, seed: int, horizon: float) -> list[tuple[float, float]]:
    """The profile's spot outages plus, at `outagesPerDay`, random ones (the same for every policy)."""
    windows = [w for w in profile.spot_outages if w[0] < horizon]
    if profile.outages_per_day > 0:
        rng = np.random.default_rng([seed, 3])
        for _ in range(rng.poisson(profile.outages_per_day * horizon / 86400.0)):
            start = float(rng.uniform(0, horizon))
            length = profile.outage_minutes * 60.0 * float(rng.uniform(0.5, 1.5))
            windows.append((start, start + length))
    return sorted(windows)


def controller_for(name: str, profile: Profile, *, peak: int, start: int | None = None):
    """`start`: engines every autoscaler has ready at t=0 (default: the floor)."""
    policy = profile.scaling_policy()
    if name == PEAK:
        return FixedController(name=name, engines=peak)
    base = NO_SPOT.get(name, name)
    spot = profile.spot_settings()
    if name in NO_SPOT:
        spot = dataclasses.replace(spot, enabled=False)
    baselines = {KUBEAI: (KubeAIController, profile.kubeai), KEDA: (KedaController, profile.keda)}
    if base in baselines:
        controller, settings = baselines[base]
        return controller(
            name=name,
            settings=settings,
            spot=spot,
            min_replicas=policy.floor,
            max_replicas=policy.max_replicas,
            start=start,
        )
    if base == SPOTRAG:
        return SpotragController(
            name=name, policy=policy, spot=spot, interval=profile.control_interval_seconds, start=start
        )
    raise ValueError(f"unknown policy {name!r} (known: {', '.join(KNOWN)})")


def sized(profile: Profile, trace: list[TraceRequest], peak: int, utilization: float = TARGET_UTILIZATION) -> Profile:
    """Fill in what the profile left to the simulator: KubeAI's target and
    spotrag's slo.targetUtilization (for engines `utilization` busy), and
    maxReplicas (1.5x the peak fleet). spotrag sizes itself to the SLO unless
    the profile sets targetQueuedTokensPerReplica."""
    scaling = profile.spec["scaling"]
    load = suggested_targets(profile.engine, trace, utilization)
    if not profile.utilization_set and not profile.target_set:
        # One knob for every autoscaler: how busy their targets keep the engines.
        slo = {**(scaling.get("slo") or {}), "targetUtilization": utilization}
        profile = profile.with_scaling(slo=slo)
    if not profile.max_replicas_set:
        profile = profile.with_scaling(
            maxReplicas=max(math.ceil(1.5 * peak), scaling["onDemandBaseline"], scaling["minReplicas"], 1)
        )
    if profile.kubeai.target_requests is None:
        profile = dataclasses.replace(
            profile, kubeai=dataclasses.replace(profile.kubeai, target_requests=max(1, round(load.in_flight_requests)))
        )
    return profile


# The peak search: the busiest minutes are each simulated after this lead-in
# (queues build up as they would), with a static on-demand fleet.
PEAK_LEAD_MINUTES = 10
PEAK_MINUTES_CHECKED = 3


def busiest_minutes(trace: list[TraceRequest], profile: Profile, horizon: float, count: int) -> list[int]:
    """The `count` minutes with the most engine work, at least a lead-in apart."""
    minutes = max(1, int(math.ceil(horizon / 60.0)))
    index = np.minimum(np.array([r.arrival // 60 for r in trace], dtype=int), minutes - 1)
    work = np.array([engine_seconds_per_request(profile.engine, r.prompt_tokens, r.output_tokens) for r in trace])
    per_minute = np.bincount(index, weights=work, minlength=minutes)
    chosen: list[int] = []
    for minute in np.argsort(-per_minute, kind="stable"):
        if all(abs(int(minute) - c) > PEAK_LEAD_MINUTES for c in chosen):
            chosen.append(int(minute))
        if len(chosen) == count:
            break
    return chosen


def _fleet_meets_slo(profile: Profile, trace: list[TraceRequest], minute: int, engines: int, seed: int) -> bool:
    start = max(0, minute - PEAK_LEAD_MINUTES) * 60.0
    end = (minute + 1) * 60.0
    window = [dataclasses.replace(r, arrival=r.arrival - start) for r in trace if start <= r.arrival < end]
    if not window:
        return True
    quiet = dataclasses.replace(profile, interruptions_per_hour=0.0)
    result = Simulation(
        quiet, window, FixedController(name=PEAK, engines=engines), seed=seed, horizon=end - start, outages=[]
    ).run()
    target = [r for r in result.requests if r.arrival >= (minute * 60.0 - start)]
    ttft = np.array(
        [(r.first_token - r.arrival) if r.first_token is not None and r.lost is None else np.inf for r in target]
    )
    value = minute_percentiles(np.zeros(ttft.size), ttft, 60.0, profile.slo_percentile)[0]
    return bool(np.isnan(value) or value <= profile.slo_ttft_seconds)


# No fleet this many times the rule of thumb meets it: the SLO is out of reach
# (prompts whose prefill alone takes longer), and the search stops there.
PEAK_SEARCH_LIMIT = 8


def peak_fleet(
    profile: Profile, trace: list[TraceRequest], horizon: float, *, seed: int
) -> tuple[int, list[int], bool]:
    """The smallest static on-demand fleet whose TTFT percentile meets the SLO in
    each of the trace's busiest minutes (searched: the fluid engine model, not
    a utilization rule of thumb). Returns (engines, the minutes checked,
    whether it meets the SLO: False when no fleet up to PEAK_SEARCH_LIMIT×
    the rule of thumb does; that fleet is then used)."""
    minutes = busiest_minutes(trace, profile, horizon, PEAK_MINUTES_CHECKED)

    def meets(n: int) -> bool:
        return all(_fleet_meets_slo(profile, trace, m, n, seed) for m in minutes)

    low = 1
    high = rule = max(1, peak_engines(trace, profile.engine, horizon))
    while not meets(high):  # grow until it meets, then bisect
        if high >= PEAK_SEARCH_LIMIT * rule:
            return rule, minutes, False
        low, high = high + 1, min(high * 2, PEAK_SEARCH_LIMIT * rule)
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return high, minutes, True


def compare(
    profile: Profile,
    trace: list[TraceRequest],
    *,
    seed: int,
    horizon: float | None = None,
    policies: tuple[str, ...] = POLICIES,
    utilization: float = TARGET_UTILIZATION,
    start_engines: int | None = None,
    dropped_oversized: int = 0,
) -> Comparison:
    """Simulate each policy on the same trace, spot outages and seed."""
    unknown = [p for p in policies if p not in KNOWN]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    if not trace:
        raise ValueError("the trace has no requests")
    check_fits(trace, profile.engine.max_model_len)
    horizon = horizon or math.ceil(max(r.arrival for r in trace) / 60.0 + 1) * 60.0
    peak, peak_minutes, peak_meets = peak_fleet(profile, trace, horizon, seed=seed)
    profile = sized(profile, trace, peak, utilization)
    scaling = profile.spec["scaling"]
    start = profile.scaling_policy().floor if start_engines is None else start_engines
    outages = draw_outages(profile, seed=seed, horizon=horizon)
    results = {}
    for name in policies:
        controller = controller_for(name, profile, peak=peak, start=start)
        results[name] = Simulation(profile, trace, controller, seed=seed, horizon=horizon, outages=outages).run()
    summaries = [summarize(results[name], profile) for name in policies]
    if PEAK in results:
        reference = next(s for s in summaries if s.policy == PEAK).cost
        summaries = [dataclasses.replace(s, cost_vs_peak=s.cost / reference if reference else None) for s in summaries]
    meta = {
        "gpu": profile.gpu,
        "model": profile.model,
        "seed": seed,
        "hours": horizon / 3600.0,
        "requests": len(trace),
        "peak_engines": peak,
        "peak_engines_rule_of_thumb": peak_engines(trace, profile.engine, horizon),
        "peak_minutes_checked": peak_minutes,
        "peak_fleet_meets_slo": peak_meets,
        "start": (
            f"every autoscaler starts with {start} engine(s) ready (the on-demand baseline first, then spot) and "
            f"nothing queued; on-demand for peak starts with its {peak} engines ready"
        ),
        "dropped_oversized": dropped_oversized,
        "max_replicas": scaling["maxReplicas"],
        "target_queued_tokens_per_replica": scaling.get("targetQueuedTokensPerReplica"),
        "spotrag_sizing": "targetQueuedTokensPerReplica" if profile.target_set else "slo",
        "spotrag_calibration": scaling.get("calibration"),
        "queue_timeout_seconds": profile.spec["gateway"]["queueTimeoutSeconds"],
        "kubeai_target_requests": profile.kubeai.target_requests,
        "keda_waiting_threshold": profile.keda.waiting_threshold,
        "spot_outages_hours": [[round(a / 3600.0, 3), round(b / 3600.0, 3)] for a, b in outages],
        "interruptions_per_hour": profile.interruptions_per_hour,
        "notice_seconds": profile.notice_seconds,
        "prices_per_gpu_hour": {"on-demand": profile.on_demand_price, "spot": profile.spot_price},
        "engine": {
            "prefill_tokens_per_s": round(profile.engine.prefill_tokens_per_second),
            "single_stream_tokens_per_s": round(profile.engine.single_stream_tokens_per_second, 1),
            "kv_cache_tokens": profile.engine.kv_cache_tokens,
        },
        "slo": {"ttft_seconds": profile.slo_ttft_seconds, "percentile": profile.slo_percentile},
    }
    return Comparison(summaries=summaries, results=results, meta=meta, profile=profile)
