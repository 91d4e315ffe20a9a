"""What a run measured: cost, GPU-hours, TTFT, SLO minutes, lost requests; a table and a PNG."""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import asdict, dataclass

import numpy as np

from spotrag_operator.placement import ON_DEMAND, SPOT

from .presets import Profile
from .sim import RunResult


@dataclass(frozen=True)
class Summary:
    policy: str
    cost: float  # dollars over the trace's duration
    cost_vs_peak: float | None  # cost / cost of on-demand for peak
    gpu_hours_spot: float
    gpu_hours_on_demand: float
    requests: int
    completed: int
    lost_interrupted: int  # died with an interrupted engine
    lost_queue_timeout: int  # 503 from the gateway after queueTimeoutSeconds
    unfinished: int  # still not done an hour after the trace ended
    ttft_over_timeout: int  # completed, but waited longer than the gateway would have (queueTimeoutSeconds)
    ttft_p50: float
    ttft_p95: float
    ttft_p99: float
    slo_minutes: float  # share of minutes whose p-th percentile TTFT met the SLO
    interruptions: int
    resumed: int  # requests continued on another engine mid-answer
    retried: int  # requests sent to another engine before their first token
    scale_changes: int
    spot_fallbacks: int
    max_ready_engines: int
    # Warm-up (from the start until WARM_MINUTES minutes in a row meet the SLO), reported apart.
    warmup_seconds: float = 0.0  # to the SLO (the horizon if never)
    warmup_lost: int = 0
    steady_slo_minutes: float = 1.0  # after warm-up
    steady_lost: int = 0
    feedback_changes: int = 0
    out_of_reach: float = 0.0  # share of the autoscaler's decisions that found the SLO out of reach
    slo_problem: str | None = None  # why (autoscale.slo_reach's message), the last one seen

    @property
    def lost(self) -> int:
        return self.lost_interrupted + self.lost_queue_timeout + self.unfinished


def gpu_hours(result: RunResult, profile: Profile) -> dict[str, float]:
    hours = {SPOT: 0.0, ON_DEMAND: 0.0}
    for engine in result.engines:
        if engine.launched is None:
            continue
        start = min(max(engine.launched, 0.0), result.horizon)
        end = min(result.horizon if engine.gone is None else engine.gone, result.horizon)
        hours[engine.capacity] += max(0.0, end - start) / 3600.0 * profile.gpus_per_engine
    return hours


def minute_percentiles(arrivals: np.ndarray, ttft: np.ndarray, horizon: float, percentile: float) -> np.ndarray:
    """The nearest-rank percentile of TTFT per minute of arrival (inf for a lost request; nan for an empty minute)."""
    minutes = int(math.ceil(horizon / 60.0))
    index = np.minimum((arrivals // 60).astype(int), minutes - 1)
    order = np.lexsort((ttft, index))
    index, ttft = index[order], ttft[order]
    result = np.full(minutes, np.nan)
    bounds = np.searchsorted(index, np.arange(minutes + 1))
    for minute in range(minutes):
        lo, hi = bounds[minute], bounds[minute + 1]
        if hi > lo:
            rank = max(1, math.ceil(percentile / 100.0 * (hi - lo)))
            result[minute] = ttft[lo + rank - 1]
    return result


WARM_MINUTES = 5


def warmup_minutes(met: np.ndarray) -> int:
    """Minutes until the first run of WARM_MINUTES met minutes begins (len(met) if none)."""
    run = 0
    for minute, ok in enumerate(met):
        run = run + 1 if ok else 0
        if run == WARM_MINUTES:
            return minute - WARM_MINUTES + 1
    return len(met)


def summarize(result: RunResult, profile: Profile) -> Summary:
    requests = [r for r in result.requests if r.arrival < result.horizon]
    arrivals = np.array([r.arrival for r in requests])
    ttft = np.array(
        [(r.first_token - r.arrival) if (r.first_token is not None and r.lost is None) else np.inf for r in requests]
    )
    done = ttft[np.isfinite(ttft)]
    per_minute = minute_percentiles(arrivals, ttft, result.horizon, profile.slo_percentile)
    met = np.isnan(per_minute) | (per_minute <= profile.slo_ttft_seconds)
    warm = warmup_minutes(met)
    lost = np.array([r.lost is not None for r in requests], dtype=bool)
    after = arrivals >= warm * 60.0
    hours = gpu_hours(result, profile)
    cost = hours[SPOT] * profile.spot_price + hours[ON_DEMAND] * profile.on_demand_price
    log = result.log
    return Summary(
        policy=result.name,
        cost=cost,
        cost_vs_peak=None,
        gpu_hours_spot=hours[SPOT],
        gpu_hours_on_demand=hours[ON_DEMAND],
        requests=len(requests),
        completed=int(done.size),
        lost_interrupted=sum(1 for r in requests if r.lost == "interrupted"),
        lost_queue_timeout=sum(1 for r in requests if r.lost == "queue timeout"),
        unfinished=sum(1 for r in requests if r.lost == "unfinished"),
        ttft_over_timeout=int(np.sum(done > profile.spec["gateway"]["queueTimeoutSeconds"])),
        ttft_p50=float(np.percentile(done, 50)) if done.size else math.nan,
        ttft_p95=float(np.percentile(done, 95)) if done.size else math.nan,
        ttft_p99=float(np.percentile(done, 99)) if done.size else math.nan,
        slo_minutes=float(met.mean()),
        interruptions=result.interruptions,
        resumed=result.resumed,
        retried=result.retried,
        scale_changes=getattr(log, "changes", 0),
        spot_fallbacks=getattr(log, "give_ups", 0),
        max_ready_engines=int(max(result.samples["ready"], default=0)),
        warmup_seconds=warm * 60.0,
        warmup_lost=int(np.sum(lost & ~after)),
        steady_slo_minutes=float(met[warm:].mean()) if warm < len(met) else 0.0,
        steady_lost=int(np.sum(lost & after)),
        feedback_changes=getattr(log, "feedback_changes", 0),
        out_of_reach=getattr(log, "out_of_reach", 0) / max(1, getattr(log, "decisions", 0)),
        slo_problem=getattr(log, "slo_problem", None),
    )


def table(summaries: list[Summary]) -> str:
    """A Markdown table, one row per policy."""
    header = (
        "| policy | cost | × on-demand peak | GPU-h spot / on-demand | TTFT p50 / p95 / p99 (s) | minutes in SLO "
        "| after warm-up: minutes in SLO / lost | warm-up: s to SLO / lost "
        "| lost (interrupted / 503 / unfinished) | served after the queue timeout | resumed | interruptions | most engines ready |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for s in summaries:
        ratio = "—" if s.cost_vs_peak is None else f"{s.cost_vs_peak:.2f}"
        lines.append(
            f"| {s.policy} | ${s.cost:,.2f} | {ratio} | {s.gpu_hours_spot:.1f} / {s.gpu_hours_on_demand:.1f} | "
            f"{s.ttft_p50:.2f} / {s.ttft_p95:.2f} / {s.ttft_p99:.2f} | {s.slo_minutes:.2%} | "
            f"{s.steady_slo_minutes:.2%} / {s.steady_lost} | {s.warmup_seconds:.0f} / {s.warmup_lost} | "
            f"{s.lost} ({s.lost_interrupted} / {s.lost_queue_timeout} / {s.unfinished}) | {s.ttft_over_timeout} | {s.resumed} | {s.interruptions} | {s.max_ready_engines} |"
        )
    return "\n".join(lines)


def write_json(path: pathlib.Path, summaries: list[Summary], meta: dict) -> None:
    # NaN (no request completed) is not JSON: write null instead.
    policies = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in (asdict(s) | {"lost": s.lost}).items()}
        for s in summaries
    ]
    path.write_text(
        json.dumps({"meta": meta, "policies": policies}, indent=2, sort_keys=True, allow_nan=False) + "\n",
        encoding="utf-8",
    )


def plot(path: pathlib.Path, results: dict[str, RunResult], profile: Profile, focus: str = "spotrag") -> None:
    """Load, queued tokens and engines over time: `focus` in detail, the others' engine counts as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results[focus]
    hours = np.array(main.samples["time"]) / 3600.0
    figure, (load, queue, engines) = plt.subplots(3, 1, figsize=(12, 9), sharex=True, constrained_layout=True)
    load.plot(hours, np.array(main.samples["arrived_tokens"]) / 60.0, color="tab:gray", linewidth=0.8)
    load.set_ylabel("arriving tokens/s")
    load.set_title(f"{profile.gpu} · {profile.model} — load, queued tokens and engines over the trace")
    queue.plot(hours, main.samples["queued_tokens"], color="tab:purple", linewidth=0.8)
    target = profile.spec["scaling"].get("targetQueuedTokensPerReplica")
    queue.set_ylabel(f"queued tokens ({focus})")
    basis = (
        f"target {target} per engine"
        if target
        else f"sized to TTFT p{profile.slo_percentile:g} <= {profile.slo_ttft_seconds:g}s"
    )
    queue.annotate(basis, xy=(0.01, 0.9), xycoords="axes fraction", fontsize=8)
    engines.stackplot(
        hours,
        main.samples["ready_on_demand"],
        main.samples["ready_spot"],
        labels=[f"{focus}: on-demand ready", f"{focus}: spot ready"],
        colors=["tab:blue", "tab:orange"],
        alpha=0.6,
    )
    # Line colours apart from the blue and orange of the stacked areas.
    colours = iter(["black", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive"])
    for name, result in results.items():
        if name != focus:
            engines.step(
                np.array(result.samples["time"]) / 3600.0,
                result.samples["ready"],
                where="post",
                linewidth=0.7,
                alpha=0.8,
                color=next(colours, "gray"),
                label=f"{name}: ready",
            )
    for axes in (load, queue, engines):
        for number, (start, end) in enumerate(main.outages):
            axes.axvspan(
                start / 3600.0,
                end / 3600.0,
                color="tab:red",
                alpha=0.12,
                label="no spot to be had" if axes is engines and number == 0 else None,
            )
    engines.set_ylabel("engines")
    engines.set_xlabel("hours")
    engines.legend(loc="upper left", fontsize=7, ncol=3)
    figure.savefig(path, dpi=110)
    plt.close(figure)
