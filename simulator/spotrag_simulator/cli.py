"""`spotrag simulate`: what a RAGDeployment would cost and how often it would miss
its latency target on a trace, next to the alternatives."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from .presets import GPUS, MODELS, ProfileError, build_profile, load_profile
from .report import plot, table, write_json
from .run import POLICIES, compare
from .sizing import TARGET_UTILIZATION
from .trace import GENERATORS, TraceError, drop_oversized, generate_trace, load_trace, write_trace

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotrag simulate",
        description=(
            "Simulate one RAGDeployment on a request trace with the operator's own autoscaling and placement "
            "code, and compare it with on-demand for peak, KubeAI-style request-count scaling and KEDA on "
            "vLLM's waiting requests: cost, GPU-hours, TTFT, minutes within the SLO, lost requests."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--trace", type=pathlib.Path, help="a .jsonl or .csv trace: arrival (s), prompt_tokens, output_tokens"
    )
    source.add_argument("--generate", choices=GENERATORS, help="generate a trace instead (default: bursty)")
    parser.add_argument("--hours", type=float, default=24.0, help="length of a generated trace")
    parser.add_argument(
        "--start-hour",
        type=float,
        default=0.0,
        help="hour of the day a generated trace starts at (14: busy from the first minute, a warm-up at the floor)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the generated trace, interruptions and outages")
    parser.add_argument(
        "--peak-rps", type=float, default=2.0, help="requests/s of a generated trace at the busiest hour, before bursts"
    )
    parser.add_argument("--profile", type=pathlib.Path, help="cluster profile YAML (docs/autoscaling.md describes it)")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="GPU preset (overrides the profile's)")
    parser.add_argument("--model", choices=sorted(MODELS), help="model preset (overrides the profile's)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies to run")
    parser.add_argument(
        "--utilization",
        type=float,
        default=TARGET_UTILIZATION,
        help="engine busyness the autoscalers' targets are sized for, where the profile sets none",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("simulate-out"),
        help="where report.json, report.md and timeline.png go",
    )
    parser.add_argument("--no-png", action="store_true", help="skip the timeline PNG")
    parser.add_argument(
        "--drop-oversized",
        action="store_true",
        help="drop requests longer than the model's context (counted in the report) instead of refusing the trace",
    )
    parser.add_argument(
        "--start-engines",
        type=int,
        help="engines every autoscaler has ready at the start (default: the floor, minReplicas / on-demand baseline)",
    )
    return parser


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        profile = (
            load_profile(args.profile, gpu=args.gpu, model=args.model)
            if args.profile
            else build_profile(gpu=args.gpu, model=args.model)
        )
        if args.trace:
            trace = load_trace(args.trace)
            horizon = None
        else:
            trace = generate_trace(
                args.generate or "bursty",
                hours=args.hours,
                seed=args.seed,
                peak_rps=args.peak_rps,
                start_hour=args.start_hour,
            )
            horizon = args.hours * 3600.0
            if not trace:
                raise TraceError(
                    f"the generated trace has no requests (--hours {args.hours}, --peak-rps {args.peak_rps})"
                )
        dropped = 0
        if args.drop_oversized:
            trace, dropped = drop_oversized(trace, profile.engine.max_model_len)
            if not trace:
                raise TraceError("every request is longer than the model's context")
        if args.start_engines is not None and args.start_engines < 0:
            raise ValueError(f"--start-engines must not be negative, got {args.start_engines}")
        if not 0 < args.utilization < 1:
            raise ValueError(f"--utilization must be between 0 and 1, got {args.utilization}")
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        comparison = compare(
            profile,
            trace,
            seed=args.seed,
            horizon=horizon,
            policies=policies,
            utilization=args.utilization,
            start_engines=args.start_engines,
            dropped_oversized=dropped,
        )
    except (ProfileError, TraceError, ValueError) as error:
        print(f"spotrag simulate: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    args.out.mkdir(parents=True, exist_ok=True)
    meta = comparison.meta | {
        "trace": str(args.trace)
        if args.trace
        else f"generated {args.generate or 'bursty'}, {args.hours:g} h from {args.start_hour:g}:00, peak {args.peak_rps:g} req/s"
    }
    rendered = table(comparison.summaries)
    write_json(args.out / "report.json", comparison.summaries, meta)
    (args.out / "report.md").write_text(f"{rendered}\n", encoding="utf-8")
    if not args.trace:
        write_trace(trace, args.out / "trace.jsonl")
    print(rendered)
    print(
        f"\n{meta['requests']} requests over {meta['hours']:g} h on {profile.gpu} / {profile.model}; "
        f"on-demand for peak = {meta['peak_engines']} engines; autoscalers up to {meta['max_replicas']}; "
        + (
            f"spotrag target {meta['target_queued_tokens_per_replica']} queued tokens per engine"
            if meta["target_queued_tokens_per_replica"]
            else f"spotrag sized to TTFT p{profile.slo_percentile:g} <= {profile.slo_ttft_seconds:g}s"
        )
    )
    if not args.no_png:
        try:
            plot(args.out / "timeline.png", comparison.results, comparison.profile, focus=policies[-1])
        except ImportError:
            print("no timeline.png: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    if not meta["peak_fleet_meets_slo"]:
        print(
            f"no static fleet up to {meta['peak_engines'] * 8} engines meets TTFT p{profile.slo_percentile:g} <= "
            f"{profile.slo_ttft_seconds:g}s in the busiest minutes: on-demand for peak uses the rule of thumb "
            f"({meta['peak_engines']} engines at 80% busy)"
        )
    print(meta["start"])
    for summary in comparison.summaries:
        if summary.slo_problem:
            print(
                f"{summary.policy}: SLO out of reach in {summary.out_of_reach:.0%} of decisions; {summary.slo_problem}"
            )
    if dropped:
        print(f"dropped {dropped} requests longer than the context ({profile.engine.max_model_len} tokens)")
    print(f"wrote {args.out}/ in {time.monotonic() - started:.0f}s")
    return 0
