"""The SLO-sizing benchmark of docs/benchmarks.md ("Sizing to the SLO", issue 12).

    python bench/slo_bench.py            # all tables, ~12 minutes on 2 shared cores
    python bench/slo_bench.py --quick    # the two main tables only
    python bench/slo_bench.py --sweep-only   # the equal-cost sweeps only (~6 minutes)

Each run is `spotrag simulate` on a generated day (bench/simulate-slo.yaml:
spot interrupted at 5% per node-hour, 2-minute notices), every policy from
the same start (the floor: one on-demand engine ready, nothing queued).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from spotrag_simulator.presets import load_profile
from spotrag_simulator.report import table
from spotrag_simulator.run import (
    KEDA,
    KEDA_NO_SPOT,
    KUBEAI,
    KUBEAI_NO_SPOT,
    PEAK,
    SPOTRAG,
    SPOTRAG_NO_SPOT,
    compare,
)
from spotrag_simulator.sizing import suggested_targets
from spotrag_simulator.sweep import curves_table, equal_cost_table, sweep
from spotrag_simulator.trace import generate_trace

PROFILE = pathlib.Path(__file__).with_name("simulate-slo.yaml")
DAY = 24.0
START_HOUR = 14.0  # the day starts busy: the first minutes find the fleet at its floor

RUNS = {
    "conversation": {"gpu": "L4", "model": "7b", "peak_rps": 5.4},
    "code": {"gpu": "A100-80GB", "model": "8b", "peak_rps": 12.0},
}


def run(kind, *, gpu, model, peak_rps, seed=1, policies=None, hours=DAY, edit=None):
    profile = load_profile(PROFILE, gpu=gpu, model=model)
    if edit:
        profile = edit(profile)
    trace = generate_trace(kind, hours=hours, seed=seed, peak_rps=peak_rps, start_hour=START_HOUR)
    kwargs = {"policies": policies} if policies else {}
    return profile, trace, compare(profile, trace, seed=seed, horizon=hours * 3600.0, **kwargs)


# Each policy's own knob, swept for the equal-cost comparison, with spot and
# without (on-demand only: spotrag-no-spot is read against the baselines on
# on-demand). KubeAI's targetRequests is a whole number (its CRD); on the code
# trace 1 request per engine is already what 50%-busy engines hold, so its
# sweep cannot go dearer. KEDA's curve is flat over 0.25-16 with spot; without
# spot 32 and 64 try to reach down to spotrag-no-spot's costs.
CONVERSATION_SWEEP = {
    SPOTRAG: (0.3, 0.4, 0.5, 0.6, 0.7),
    KUBEAI: (1, 2, 3, 4, 5, 6, 7, 8, 9, 11),
    KEDA: (0.25, 0.5, 1, 2, 4, 8, 16),
    SPOTRAG_NO_SPOT: (0.4, 0.5, 0.6),
    KUBEAI_NO_SPOT: (1, 2, 3, 4, 5, 6, 7, 8, 9, 11),
    KEDA_NO_SPOT: (0.25, 1, 4, 16, 32, 64),
}
SWEEPS = {
    ("conversation", 1): CONVERSATION_SWEEP,
    ("conversation", 2): CONVERSATION_SWEEP,
    ("code", 1): {
        SPOTRAG: (0.3, 0.4, 0.5, 0.6, 0.7),
        KUBEAI: (1, 2, 3),
        KEDA: (0.25, 0.5, 1, 2, 4, 8, 16),
        SPOTRAG_NO_SPOT: (0.4, 0.5, 0.6),
        KUBEAI_NO_SPOT: (1, 2, 3),
        KEDA_NO_SPOT: (0.25, 1, 4, 16, 32, 64),
    },
}
# Who is read against whom at equal cost: each spotrag variant against the
# baselines on the same capacity.
READINGS = (((SPOTRAG,), (KUBEAI, KEDA)), ((SPOTRAG_NO_SPOT,), (KUBEAI_NO_SPOT, KEDA_NO_SPOT)))


def equal_cost(processes: int = 2) -> None:
    """Every policy at several settings of its own knob; each spotrag point read against the baselines' curves."""
    for (kind, seed), settings in SWEEPS.items():
        run_settings = RUNS[kind]
        profile = load_profile(PROFILE, gpu=run_settings["gpu"], model=run_settings["model"])
        trace = generate_trace(kind, hours=DAY, seed=seed, peak_rps=run_settings["peak_rps"], start_hour=START_HOUR)
        points, meta = sweep(profile, trace, settings, seed=seed, horizon=DAY * 3600.0, processes=processes)
        print(
            f"\n### Equal cost: {kind}-like day, seed {seed} ({run_settings['gpu']} / {run_settings['model']}; "
            f"on-demand for peak {meta['peak_engines']} engines; up to {meta['max_replicas']})\n"
        )
        print(curves_table(points))
        for references, against in READINGS:
            print()
            print(equal_cost_table(points, references, against))


def describe(kind, settings, result, seed=1):
    meta = result.meta
    peak = f"{meta['peak_engines']} engines (searched; rule of thumb {meta['peak_engines_rule_of_thumb']})"
    if not meta["peak_fleet_meets_slo"]:
        peak = f"no static fleet meets the SLO; rule of thumb {meta['peak_engines']} used"
    return (
        f"{kind}-like day from {START_HOUR:g}:00, peak {settings['peak_rps']:g} req/s at the busiest hour, seed {seed}: "
        f"{meta['requests']} requests. {meta['gpu']} / {meta['model']} (spotrag starts from preset "
        f"{(meta['spotrag_calibration'] or {}).get('preset', 'custom')}); on-demand for peak = {peak}; autoscalers "
        f"up to {meta['max_replicas']}; KubeAI target {meta['kubeai_target_requests']:g} requests, KEDA threshold "
        f"{meta['keda_waiting_threshold']:g} waiting; queue timeout {meta['queue_timeout_seconds']} s; "
        f"${meta['prices_per_gpu_hour']['on-demand']:.4g} on-demand, ${meta['prices_per_gpu_hour']['spot']:.4g} "
        f"spot per GPU-hour. {meta['start']}."
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--processes", type=int, default=2, help="for the sweeps")
    args = parser.parse_args(argv)
    if args.sweep_only:
        equal_cost(args.processes)
        return 0

    for kind, settings in RUNS.items():
        _, _, result = run(kind, **settings)
        print(f"\n### {kind}\n\n{describe(kind, settings, result)}\n\n{table(result.summaries)}")
        changes = {s.policy: (s.scale_changes, s.feedback_changes) for s in result.summaries}
        print(f"\nscale changes / feedback moves over the day: {changes}")
    if args.quick:
        return 0

    print(
        "\n### Other seeds\n\n| trace | seed | policy | × peak | SLO min after warm-up | lost after warm-up | warm-up s / lost |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, settings in RUNS.items():
        _, _, result = run(kind, seed=2, policies=(PEAK, SPOTRAG_NO_SPOT, SPOTRAG), **settings)
        for s in result.summaries[1:]:
            print(
                f"| {kind} | 2 | {s.policy} | {s.cost_vs_peak:.3f} | {s.steady_slo_minutes:.2%} | {s.steady_lost} | "
                f"{s.warmup_seconds:.0f} / {s.warmup_lost} |"
            )

    # The complaint: one queued-token target for prompt and output alike.
    settings = RUNS["conversation"]
    profile, trace, _ = run("conversation", policies=(PEAK,), hours=0.1, **settings)
    target = max(
        1,
        round(
            suggested_targets(
                profile.engine,
                generate_trace("conversation", hours=DAY, seed=1, peak_rps=settings["peak_rps"], start_hour=START_HOUR),
            ).queued_tokens
        ),
    )

    def with_target(p):
        return dataclasses.replace(p.with_scaling(targetQueuedTokensPerReplica=target), target_set=True)

    def with_timeout(seconds):
        def edit(p):
            return dataclasses.replace(
                p, spec={**p.spec, "gateway": {**p.spec["gateway"], "queueTimeoutSeconds": seconds}}
            )

        return edit

    print("\n### One target for every token vs sizing to the SLO (conversation, seed 1)\n")
    print("| spotrag sized on | × peak (spot) | × peak (spot off) | SLO min after warm-up | lost |")
    print("|---|---|---|---|---|")
    for label, edit in (
        (f"targetQueuedTokensPerReplica {target} (50% busy)", with_target),
        ("the SLO (default)", None),
    ):
        _, _, result = run("conversation", policies=(PEAK, SPOTRAG_NO_SPOT, SPOTRAG), edit=edit, **settings)
        off, on = result.summaries[1], result.summaries[2]
        print(f"| {label} | {on.cost_vs_peak:.3f} | {off.cost_vs_peak:.3f} | {on.steady_slo_minutes:.2%} | {on.lost} |")

    print("\n### The first burst at the floor: the gateway's queue timeout (conversation, first 2 hours)\n")
    print("| queueTimeoutSeconds | warm-up s to SLO | lost in warm-up (503) | lost after |")
    print("|---|---|---|---|")
    for seconds in (30, 300):
        _, _, result = run("conversation", policies=(PEAK, SPOTRAG), hours=2.0, edit=with_timeout(seconds), **settings)
        s = result.summaries[1]
        print(f"| {seconds} | {s.warmup_seconds:.0f} | {s.warmup_lost} | {s.steady_lost} |")

    settings = {"gpu": "L4", "model": "7b", "peak_rps": 10.0}
    _, _, result = run("code", **settings)
    print(
        f"\n### code on an L4 (an SLO out of reach)\n\n{describe('code', settings, result)}\n\n{table(result.summaries)}"
    )
    changes = {s.policy: (s.scale_changes, s.feedback_changes) for s in result.summaries}
    print(f"\nscale changes / feedback moves over the day: {changes}")
    for s in result.summaries:
        if s.slo_problem:
            print(f"\n{s.policy}: SLO out of reach in {s.out_of_reach:.0%} of decisions; the last: {s.slo_problem}")
    equal_cost(args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
