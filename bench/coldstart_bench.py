"""What starting engines fast buys on spot (issue 18): replacement-ready time
against the notice, then lost requests and SLO minutes in the simulator.

    python bench/coldstart_bench.py         # prints the Markdown for docs/benchmarks.md

An engine replacing one on an interrupted node is ready after a new node
(unless a standby already runs on one) plus its pod's start: image pull,
weights, vLLM's own start. Each stage's time and where it comes from is in
STAGES; the ways of starting (cold, streamer, node cache, standby) add them
up differently. The simulator (`spotrag simulate`, the operator's own
autoscaler and placement) then runs the spotrag policy on generated traces
with each way's node start and pod-to-Ready time (its profile's
nodes.startSeconds and nodes.modelLoadSeconds), at AWS's 120 s notice and
GCE's/Azure's 30 s.

A standby is modelled as every new engine ready 0.8 s after it is asked
for, on no new node: as if a standby were always there (an upper bound on
what `standby.replicas` buys: a woken standby is replaced by a cold start
behind it, so two losses closer together than a cold start find the pool
empty); its cost, the standby GPUs kept asleep, is added to the cost column.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from dataclasses import dataclass

from spotrag_simulator.presets import load_profile
from spotrag_simulator.run import SPOTRAG, compare
from spotrag_simulator.trace import generate_trace

PROFILE = pathlib.Path(__file__).with_name("simulate-profile.yaml")
HOURS, SEED, START_HOUR = 4, 1, 11.0  # the busy part of the day
PEAK_RPS = 15.0  # requests/s at the day's peak: an H200 serves ~2 rps of these alone, so spot engines run
INTERRUPTIONS_PER_HOUR = 0.3  # per spot node: harsher than the autoscaling bench's 0.05, so losses show
NOTICES = {"AWS (120 s)": 120.0, "GCE / Azure (30 s)": 30.0}


@dataclass(frozen=True)
class Stage:
    seconds: float
    source: str


# Llama-3.1-8B in BF16 (16 GB of weights), vLLM 0.26.0, one H200.
STAGES = {
    "node": Stage(120.0, "assumption: instance launch to a schedulable GPU node (the simulator's preset)"),
    "image": Stage(60.0, "assumption: pulling the ~10 GB vllm/vllm-openai image on a fresh node at ~170 MB/s"),
    "weights_hub": Stage(80.0, "assumption: 16 GB from the Hugging Face Hub at ~200 MB/s"),
    "weights_streamed": Stage(
        10.0, "assumption: 16 GB streamed from S3 by the Run:ai streamer at ~1.6 GB/s (not measured here)"
    ),
    "weights_local": Stage(
        9.8, "measured: 15 GiB of safetensors from local disk, page cache dropped (bench/vllm_coldstart.py)"
    ),
    "vllm_first": Stage(
        135.0,
        "measured: 144.8 s to /health 200 from local disk, compile cache empty, less its 9.8 s weight read "
        "(bench/vllm_coldstart.py; the README's first start with dummy weights: 148 s)",
    ),
    "vllm_compiled": Stage(
        108.0, "measured: 110 s to /health with ~/.cache/vllm kept, less 2.3 s of dummy weights (shared/vllm/README.md)"
    ),
    "wake": Stage(
        0.80,
        "measured: POST /wake_up of a slept engine, then answers in 0.05 s (bench/vllm_coldstart.py; README: 0.81)",
    ),
}


@dataclass(frozen=True)
class Way:
    name: str
    node: tuple[str, ...]  # stages before the pod can start
    pod: tuple[str, ...]  # pod to Ready
    standby: bool = False

    def seconds(self, stages: tuple[str, ...]) -> float:
        return sum(STAGES[s].seconds for s in stages)

    @property
    def node_start(self) -> float:
        return self.seconds(self.node)

    @property
    def pod_ready(self) -> float:
        return self.seconds(self.pod)

    @property
    def ready(self) -> float:
        return self.node_start + self.pod_ready


WAYS = (
    Way("cold (emptyDir, weights from the Hub)", ("node",), ("image", "weights_hub", "vllm_first")),
    Way("runai_streamer from S3", ("node",), ("image", "weights_streamed", "vllm_first")),
    Way(
        "node cache, pre-baked on the node (weights + compile cache)",
        ("node",),
        ("weights_local", "vllm_compiled"),
    ),
    Way("node cache, a node that already ran the engine", (), ("weights_local", "vllm_compiled")),
    Way("warm standby (sleep mode)", (), ("wake",), standby=True),
)


def readiness_table() -> str:
    """spotrag takes an interrupted engine out of serving at the notice (its
    answers in flight finish or resume elsewhere), so the fleet is one engine
    short for the whole replacement-ready time, whatever the notice; the notice
    only says whether the replacement serves before the old node is gone."""
    lines = [
        "| way of starting | node | pod to Ready | replacement ready (one engine short) | "
        + " | ".join(f"ready before the node goes, {name}" for name in NOTICES)
        + " |",
        "|---|---|---|---|" + "---|" * len(NOTICES),
    ]
    for way in WAYS:
        verdicts = " | ".join(
            "yes" if way.ready <= notice else f"no, {way.ready - notice:.0f} s after" for notice in NOTICES.values()
        )
        lines.append(
            f"| {way.name} | {way.node_start:.0f} s | {way.pod_ready:.1f} s | {way.ready:.1f} s | {verdicts} |"
        )
    return "\n".join(lines)


def simulate(way: Way, notice: float, generator: str):
    profile = load_profile(PROFILE, gpu="H200", model="8b")
    profile = dataclasses.replace(
        profile,
        notice_seconds=notice,
        interruptions_per_hour=INTERRUPTIONS_PER_HOUR,
        node_start_seconds=way.node_start,
        model_load_seconds=way.pod_ready,
    )
    trace = generate_trace(generator, hours=HOURS, seed=SEED, peak_rps=PEAK_RPS, start_hour=START_HOUR)
    run = compare(profile, trace, seed=SEED, horizon=HOURS * 3600.0, policies=(SPOTRAG,))
    [summary] = run.summaries
    standby_cost = profile.spot_price * HOURS if way.standby else 0.0  # one standby GPU asleep
    return summary, standby_cost, run.meta | {"starts": starts(run.results[SPOTRAG])}


def starts(result) -> list[float]:
    """When the run asked for a new engine (those ready at the start excluded)."""
    return sorted(e.launched for e in result.engines if e.launched is not None and e.launched > 0)


def covered(times: list[float], pool: int, refill: float) -> int:
    """Starts a pool of `pool` standbys would have served, each used one
    replaced by a cold start `refill` seconds long."""
    back: list[float] = []  # when used standbys are ready again
    free, served = pool, 0
    for t in times:
        free += sum(1 for b in back if b <= t)
        back = [b for b in back if b > t]
        if free:
            free, served = free - 1, served + 1
            back.append(t + refill)
    return served


def main() -> int:
    started = time.monotonic()
    print("Stages (Llama-3.1-8B BF16, vLLM 0.26.0, one H200):\n")
    print("| stage | seconds | source |\n|---|---|---|")
    for name, stage in STAGES.items():
        print(f"| {name} | {stage.seconds:g} | {stage.source} |")
    print("\nReplacement-ready time against the notice (the replacement starts at the notice):\n")
    print(readiness_table())
    for generator in ("bursty", "diurnal"):
        meta = cold_meta = None
        rows = []
        for notice_name, notice in NOTICES.items():
            for way in WAYS:
                summary, standby_cost, meta = simulate(way, notice, generator)
                if way is WAYS[0] and notice == max(NOTICES.values()):
                    cold_meta = meta
                rows.append(
                    f"| {notice_name} | {way.name} | {way.ready:.1f} s | ${summary.cost + standby_cost:.2f} | "
                    f"{summary.slo_minutes:.2%} | {summary.ttft_p99:.2f} | {summary.lost} "
                    f"({summary.lost_interrupted} / {summary.lost_queue_timeout} / {summary.unfinished}) | "
                    f"{summary.resumed} | {summary.interruptions} |"
                )
        assert meta is not None
        cold_starts = cold_meta["starts"]
        refill = WAYS[0].ready
        pools = ", ".join(f"{n} standby{'s' if n > 1 else ''}: {covered(cold_starts, n, refill)}" for n in (1, 2, 3))
        print(
            f"\nspotrag on a generated {generator} trace, {HOURS} h from {START_HOUR:g}:00, peak {PEAK_RPS:g} requests/s, "
            f"seed {SEED}: {meta['requests']} requests, up to {meta['max_replicas']} engines; "
            f"H200 / Llama-3.1-8B (measured preset); spot interrupted at {INTERRUPTIONS_PER_HOUR:g} per node-hour; "
            f"TTFT p{meta['slo']['percentile']:g} <= {meta['slo']['ttft_seconds']:g} s:\n"
        )
        print(
            "| notice | way of starting | replacement ready | cost (+ standby) | minutes in SLO | TTFT p99 (s) "
            "| lost (interrupted / 503 / unfinished) | resumed | interruptions |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        print(
            f"\nHow many of the cold run's {len(cold_starts)} engine starts (scale-ups and replacements) "
            f"a pool of standbys would have served, each used one refilled by a {refill:.0f} s cold start: "
            f"{pools}."
        )
    print(f"\n(ran in {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
