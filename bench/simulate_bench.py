"""The autoscaling benchmark of issue 5: a bursty day on spot with interruptions.

    python bench/simulate_bench.py            # prints the Markdown for docs/benchmarks.md

Runs `spotrag simulate`'s comparison on the bursty 24 h trace (seed 1) with
bench/simulate-profile.yaml, then: spotrag with the CRD's default scale-up
stabilization (0 s), the cost/SLO frontier of spotrag and KubeAI-style
request-count scaling over the utilization their targets are sized for, two
more seeds, and GCE/Azure-style 30 s notices. About a minute and a half on one core.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

from spotrag_simulator.presets import load_profile
from spotrag_simulator.report import table
from spotrag_simulator.run import KUBEAI, PEAK, POLICIES, SPOTRAG, compare
from spotrag_simulator.sizing import TARGET_UTILIZATION
from spotrag_simulator.trace import generate_trace

PROFILE = pathlib.Path(__file__).with_name("simulate-profile.yaml")
HOURS, SEED = 24, 1


def run(profile, seed=SEED, policies=POLICIES, utilization=TARGET_UTILIZATION):
    trace = generate_trace("bursty", hours=HOURS, seed=seed)
    return compare(profile, trace, seed=seed, horizon=HOURS * 3600.0, policies=policies, utilization=utilization)


def main() -> int:
    started = time.monotonic()
    profile = load_profile(PROFILE)
    headline = run(profile)
    meta = headline.meta
    default_up = run(profile.with_scaling(scaleUpStabilizationSeconds=0), policies=(PEAK, SPOTRAG))
    rows = headline.summaries + [
        dataclasses.replace(default_up.summaries[1], policy="spotrag, scaleUpStabilization 0 s")
    ]
    print(
        f"Trace: bursty, {HOURS} h, seed {SEED}: {meta['requests']} requests. {meta['gpu']} / Mistral-7B; "
        f"on-demand for peak = {meta['peak_engines']} engines; autoscalers up to {meta['max_replicas']}; "
        f"spotrag target {meta['target_queued_tokens_per_replica'] or 'sized to the SLO'} queued tokens/engine, KubeAI target "
        f"{meta['kubeai_target_requests']} requests, KEDA threshold {meta['keda_waiting_threshold']:g} waiting "
        f"(all sized for engines {TARGET_UTILIZATION:.0%} busy); spot outages (h) {meta['spot_outages_hours']}; "
        f"${meta['prices_per_gpu_hour']['on-demand']:.4f} on-demand, ${meta['prices_per_gpu_hour']['spot']:.4f} spot per GPU-hour.\n"
    )
    print(table(rows))

    print("\nCost/SLO frontier: targets sized for engines u busy (lower u = more engines).\n")
    print(
        "| u | KubeAI target | KubeAI × peak | KubeAI SLO min | KubeAI lost | spotrag target | spotrag × peak | spotrag SLO min | spotrag lost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for utilization in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        point = run(profile, policies=(PEAK, KUBEAI, SPOTRAG), utilization=utilization)
        _, kubeai, spotrag = point.summaries
        print(
            f"| {utilization:.1f} | {point.meta['kubeai_target_requests']:g} | {kubeai.cost_vs_peak:.3f} | {kubeai.slo_minutes:.2%} | {kubeai.lost} "
            f"| {point.meta['target_queued_tokens_per_replica'] or 'slo'} | {spotrag.cost_vs_peak:.3f} | {spotrag.slo_minutes:.2%} | {spotrag.lost} |"
        )

    print(f"\nOther seeds (same profile, u = {TARGET_UTILIZATION}).\n")
    print("| seed | policy | × peak | SLO min | lost | served after the queue timeout |")
    print("|---|---|---|---|---|---|")
    for seed in (2, 3):
        for s in run(profile, seed=seed, policies=(PEAK, KUBEAI, SPOTRAG)).summaries[1:]:
            print(
                f"| {seed} | {s.policy} | {s.cost_vs_peak:.3f} | {s.slo_minutes:.2%} | {s.lost} | {s.ttft_over_timeout} |"
            )

    short = dataclasses.replace(profile, notice_seconds=30.0, interruptions_per_hour=0.2)
    print("\n30 s notices (GCE spot, Azure) at 20%/hour, seed 1.\n")
    print(table(run(short).summaries))
    print(f"\n(ran in {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
