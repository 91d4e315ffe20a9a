"""Run every policy on the same trace and world, and compare them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .policies import FixedController, KedaController, KubeAIController, SpotragController
from .presets import Profile
from .report import Summary, summarize
from .sim import RunResult, Simulation
from .sizing import TARGET_UTILIZATION, peak_engines, suggested_targets
from .trace import TraceRequest, check_fits

PEAK = "on-demand-peak"
KUBEAI = "kubeai-requests"
KEDA = "keda-waiting"
SPOTRAG_NO_SPOT = "spotrag-no-spot"
SPOTRAG = "spotrag"
POLICIES = (PEAK, KUBEAI, KEDA, SPOTRAG_NO_SPOT, SPOTRAG)


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


def controller_for(name: str, profile: Profile, *, peak: int):
    policy = profile.scaling_policy()
    if name == PEAK:
        return FixedController(name=name, engines=peak)
    if name == KUBEAI:
        return KubeAIController(
            name=name, settings=profile.kubeai, min_replicas=policy.floor, max_replicas=policy.max_replicas
        )
    if name == KEDA:
        return KedaController(
            name=name, settings=profile.keda, min_replicas=policy.floor, max_replicas=policy.max_replicas
        )
    if name == SPOTRAG_NO_SPOT:
        spot = dataclasses.replace(profile.spot_settings(), enabled=False)
        return SpotragController(name=name, policy=policy, spot=spot, interval=profile.control_interval_seconds)
    if name == SPOTRAG:
        return SpotragController(
            name=name, policy=policy, spot=profile.spot_settings(), interval=profile.control_interval_seconds
        )
    raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")


def sized(profile: Profile, trace: list[TraceRequest], peak: int, utilization: float = TARGET_UTILIZATION) -> Profile:
    """Fill in what the profile left to the simulator: KubeAI's target (for
    engines `utilization` busy) and maxReplicas (1.5x the peak fleet).
    spotrag sizes itself to the SLO unless the profile sets
    targetQueuedTokensPerReplica."""
    scaling = profile.spec["scaling"]
    load = suggested_targets(profile.engine, trace, utilization)
    if not profile.max_replicas_set:
        profile = profile.with_scaling(
            maxReplicas=max(math.ceil(1.5 * peak), scaling["onDemandBaseline"], scaling["minReplicas"], 1)
        )
    if profile.kubeai.target_requests is None:
        profile = dataclasses.replace(
            profile, kubeai=dataclasses.replace(profile.kubeai, target_requests=max(1, round(load.in_flight_requests)))
        )
    return profile


def compare(
    profile: Profile,
    trace: list[TraceRequest],
    *,
    seed: int,
    horizon: float | None = None,
    policies: tuple[str, ...] = POLICIES,
    utilization: float = TARGET_UTILIZATION,
) -> Comparison:
    """Simulate each policy on the same trace, spot outages and seed."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)} (known: {', '.join(POLICIES)})")
    if not trace:
        raise ValueError("the trace has no requests")
    check_fits(trace, profile.engine.max_model_len)
    horizon = horizon or math.ceil(max(r.arrival for r in trace) / 60.0 + 1) * 60.0
    peak = peak_engines(trace, profile.engine, horizon)
    profile = sized(profile, trace, peak, utilization)
    scaling = profile.spec["scaling"]
    outages = draw_outages(profile, seed=seed, horizon=horizon)
    results = {}
    for name in policies:
        controller = controller_for(name, profile, peak=peak)
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
