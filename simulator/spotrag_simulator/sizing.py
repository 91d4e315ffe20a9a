"""Back-of-the-envelope sizing from the engine model: the fleet for the peak,
and the autoscaling targets that run engines at a chosen utilization.

These are steady-state estimates (Little's law over the same step-cost model
the simulator runs); the simulation then shows what they do under bursts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .presets import EngineSpec
from .trace import TraceRequest

# The fixed fleet runs its engines this busy in the busiest minute.
PEAK_UTILIZATION = 0.8
# The autoscalers aim at this: engines take minutes to arrive, so the ones
# already running keep room for a burst of 2x while the new ones start.
TARGET_UTILIZATION = 0.5


def engine_seconds_per_request(spec: EngineSpec, prompt: float, output: float) -> float:
    """Busy time of one engine per request at the batch its KV cache allows."""
    need = prompt + output
    batch = max(1, min(spec.max_num_seqs, int(spec.kv_cache_tokens // need)))
    step = spec.decode_step_seconds + spec.seconds_per_token * batch + spec.seconds_per_context_token * batch * need
    return prompt * spec.seconds_per_token + output * step / batch


def peak_engines(trace: list[TraceRequest], spec: EngineSpec, horizon: float) -> int:
    """Engines that carry the busiest minute of the trace at PEAK_UTILIZATION."""
    minutes = max(1, int(math.ceil(horizon / 60.0)))
    index = np.minimum(np.array([r.arrival // 60 for r in trace], dtype=int), minutes - 1)
    work = np.array([engine_seconds_per_request(spec, r.prompt_tokens, r.output_tokens) for r in trace])
    per_minute = np.bincount(index, weights=work, minlength=minutes)
    return max(1, math.ceil(per_minute.max() / (60.0 * PEAK_UTILIZATION)))


@dataclass(frozen=True)
class EngineLoad:
    requests_per_second: float
    running: float  # sequences decoding at once
    in_flight_requests: float  # what KubeAI counts per engine
    queued_tokens: float  # what spotrag's gateway counts per engine


def engine_load(spec: EngineSpec, prompt: float, output: float, utilization: float) -> EngineLoad:
    """One engine at `utilization` of its request capacity, in steady state.

    Queued tokens = prompt tokens not yet prefilled + output tokens not yet
    generated; each falls linearly while its phase lasts, so a request holds
    on average prompt/2 over its prefill and output/2 over its decode.
    """
    if not 0 < utilization < 1:
        raise ValueError(f"utilization must be in (0, 1), got {utilization}")
    rate = utilization / engine_seconds_per_request(spec, prompt, output)
    running = 1.0
    for _ in range(100):  # the batch and the step time decide each other: iterate to the fixed point
        step = (
            spec.decode_step_seconds
            + spec.seconds_per_token * running
            + spec.seconds_per_context_token * running * (prompt + output)
        )
        running = max(rate * output * step, 1e-6)
    prefill_seconds = prompt * spec.seconds_per_token
    decode_seconds = output * step
    return EngineLoad(
        requests_per_second=rate,
        running=running,
        in_flight_requests=rate * (prefill_seconds + decode_seconds),
        queued_tokens=rate * (prompt * prefill_seconds + output * decode_seconds) / 2,
    )


def suggested_targets(
    spec: EngineSpec, trace: list[TraceRequest], utilization: float = TARGET_UTILIZATION
) -> EngineLoad:
    prompt = float(np.mean([r.prompt_tokens for r in trace]))
    output = float(np.mean([r.output_tokens for r in trace]))
    return engine_load(spec, prompt, output, utilization)
