"""How fast the engines are, learnt from their own vLLM metrics (pure: no I/O).

The autoscaler weighs queued work with two numbers per engine: how fast it
prefills a prompt token, and how long a decode step takes for the batch it
runs. Both start from a preset (`PRESETS`, or the spec's own numbers) and are
then estimated online from what every serving engine reports on /metrics:

- `vllm:prompt_tokens_total`, `vllm:generation_tokens_total` (counters),
- `vllm:num_requests_running` / `_waiting` (gauges),
- `vllm:request_prompt_tokens` (a histogram of finished requests' prompt
  lengths): its bucket deltas, summed over the engines and remembered for
  about half an hour, give the prompt length at the SLO's percentile
  (`prompt_tokens_at`), against which autoscale.slo_reach weighs the SLO.

Over an interval of Δt in which an engine had work at both ends (so it was
stepping all along), its time went to prefill and to decode steps:

    Δt ≈ Δprompt · t_prefill + (Δgenerated / batch) · a + Δgenerated · k

with a decode step costing `a + k · batch`. That is linear in
(t_prefill, a, k), so each interval is one row of a least-squares fit. The
fit starts from the preset as prior evidence (`PRIOR_WEIGHT`), forgets old
rows and the prior alike (`FORGET` per row) down to a small ridge towards the
preset, so the estimate starts at the preset, moves as evidence comes in and
follows an engine that slows down. Rows are relative (divided by Δt) so a long interval
weighs no more than a short one.

Not used: engines that are starting, draining or erroring (their numbers
are not the serving rate), intervals where a counter went backwards (an
engine restart; the next interval starts afresh), intervals longer than
`MAX_INTERVAL_SECONDS` (a missed scrape spans idle time) or idle ones.

A bounded feedback term then corrects what the model misses: while the
observed TTFT percentile sits over the SLO the fleet is sized larger, while
it sits well under, smaller (`feedback`).

Everything the next reconcile needs is in `CalibrationState`, JSON-ready, so
the operator keeps it in status and a restart resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

# -- engine speed ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineRates:
    """One engine's speed: prefill tokens/s, and a decode step of `a + k · batch` seconds."""

    prefill_tokens_per_second: float
    decode_step_seconds: float  # a: a step's fixed cost (reading the weights once)
    seconds_per_sequence: float  # k: what each running sequence adds to a step (compute + its KV read)
    kv_cache_tokens: int = 0  # 0: unknown (no KV limit on the batch)
    max_num_seqs: int = 256  # vLLM's default
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.prefill_tokens_per_second > 0 and self.decode_step_seconds > 0 and self.seconds_per_sequence > 0):
            raise ValueError(f"engine rates must be positive, got {self}")

    @classmethod
    def from_measurements(
        cls,
        *,
        prefill_tokens_per_second: float,
        decode_tokens_per_second: float,
        batch_decode_tokens_per_second: float,
        batch: int = 64,
        kv_cache_tokens: int = 0,
        max_num_seqs: int = 256,
        source: str = "",
    ) -> EngineRates:
        """From a lone stream's tokens/s and the tokens/s of `batch` streams together."""
        single, batched = 1.0 / decode_tokens_per_second, batch / batch_decode_tokens_per_second
        per_sequence = (batched - single) / (batch - 1)
        if not per_sequence > 0 or not single - per_sequence > 0:
            raise ValueError(
                f"{batch} streams at {batch_decode_tokens_per_second:g} tok/s must be faster in all than one stream at "
                f"{decode_tokens_per_second:g} tok/s, and slower each"
            )
        return cls(
            prefill_tokens_per_second=prefill_tokens_per_second,
            decode_step_seconds=single - per_sequence,
            seconds_per_sequence=per_sequence,
            kv_cache_tokens=kv_cache_tokens,
            max_num_seqs=max_num_seqs,
            source=source,
        )

    @property
    def seconds_per_prompt_token(self) -> float:
        return 1.0 / self.prefill_tokens_per_second

    def step_seconds(self, batch: float) -> float:
        return self.decode_step_seconds + self.seconds_per_sequence * batch

    def decode_tokens_per_second(self, batch: float) -> float:
        return batch / self.step_seconds(batch)

    def batch_for(self, *, inter_token_latency: float | None = None, tokens_per_request: float | None = None) -> float:
        """Streams one engine should run at once: vLLM's batch limit, what its KV
        cache holds, and, with an inter-token latency SLO, the batch whose step
        still meets it. Never below 1."""
        batch = float(self.max_num_seqs)
        if self.kv_cache_tokens and tokens_per_request:
            batch = min(batch, self.kv_cache_tokens / tokens_per_request)
        if inter_token_latency:
            batch = min(batch, (inter_token_latency - self.decode_step_seconds) / self.seconds_per_sequence)
        return max(1.0, batch)

    def to_dict(self) -> dict:
        return {
            "prefillTokensPerSecond": round(self.prefill_tokens_per_second, 1),
            "decodeStepSeconds": self.decode_step_seconds,
            "secondsPerSequence": self.seconds_per_sequence,
            "singleStreamTokensPerSecond": round(self.decode_tokens_per_second(1), 1),
            "kvCacheTokens": self.kv_cache_tokens,
            "source": self.source,
        }


MEASURED_H200_8B = "vLLM 0.26.0 on H200, 3 repeats, bench/vllm/capacity.json"
ROOFLINE = "datasheet roofline of the simulator (simulator/spotrag_simulator/presets.py), not measured"

# Per GPU / model. The H200 numbers are measured; the others are the
# simulator's roofline model at a 1,500-token context (tests hold them to it).
PRESETS: dict[str, EngineRates] = {
    "H200/Llama-3.1-8B": EngineRates.from_measurements(
        prefill_tokens_per_second=40_000,  # 37,664-41,004 (medians) for 256- to 8,192-token prompts
        decode_tokens_per_second=206,  # 1 × 128 / 256
        batch_decode_tokens_per_second=9_545,  # 64 × 128 / 256
        batch=64,
        kv_cache_tokens=896_912,
        source=MEASURED_H200_8B,
    ),
    "L4/Mistral-7B": EngineRates(
        prefill_tokens_per_second=4172,
        decode_step_seconds=0.06277,
        seconds_per_sequence=0.001091,
        kv_cache_tokens=42_724,
        source=ROOFLINE,
    ),
    "A100-80GB/Llama-3.1-8B": EngineRates(
        prefill_tokens_per_second=9714,
        decode_step_seconds=0.01023,
        seconds_per_sequence=0.0002282,
        kv_cache_tokens=415_344,
        source=ROOFLINE,
    ),
    "H100/Llama-3.1-8B": EngineRates(
        prefill_tokens_per_second=30_791,
        decode_step_seconds=0.006226,
        seconds_per_sequence=0.0001087,
        kv_cache_tokens=415_344,
        source=ROOFLINE,
    ),
}
DEFAULT_PRESET = "L4/Mistral-7B"  # the slowest: an unknown engine is sized on the safe side


def rates_from_spec(calibration: Mapping | None) -> EngineRates:
    """The starting rates from `spec.scaling.calibration`: a preset, with any number given overriding it."""
    calibration = calibration or {}
    name = calibration.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown engine preset {name!r} (known: {', '.join(PRESETS)})")
    rates = PRESETS[name]
    if "decodeTokensPerSecond" in calibration or "batchDecodeTokensPerSecond" in calibration:
        single = calibration.get("decodeTokensPerSecond") or rates.decode_tokens_per_second(1)
        batched = calibration.get("batchDecodeTokensPerSecond") or rates.decode_tokens_per_second(64)
        rates = replace(
            EngineRates.from_measurements(
                prefill_tokens_per_second=rates.prefill_tokens_per_second,
                decode_tokens_per_second=single,
                batch_decode_tokens_per_second=batched,
            ),
            kv_cache_tokens=rates.kv_cache_tokens,
            source=rates.source,
        )
    if "prefillTokensPerSecond" in calibration:
        rates = replace(rates, prefill_tokens_per_second=float(calibration["prefillTokensPerSecond"]))
    if "kvCacheTokens" in calibration:
        rates = replace(rates, kv_cache_tokens=int(calibration["kvCacheTokens"]))
    custom = set(calibration) - {"preset", "online"}
    return replace(rates, source=f"{name} ({rates.source})" + (" with the spec's numbers" if custom else ""))


# -- what an engine reports -----------------------------------------------------------

SERVING, STARTING, DRAINING, ERRORING = "serving", "starting", "draining", "erroring"

PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
REQUEST_PROMPT_SUM = "vllm:request_prompt_tokens_sum"  # prompt lengths of finished requests
REQUEST_PROMPT_COUNT = "vllm:request_prompt_tokens_count"
REQUEST_PROMPT_BUCKET = "vllm:request_prompt_tokens_bucket"


@dataclass(frozen=True, kw_only=True)
class EngineSample:
    """One scrape of one engine."""

    name: str
    time: float
    prompt_tokens: float  # counter
    generation_tokens: float  # counter
    running: float
    waiting: float
    state: str = SERVING  # only serving engines calibrate
    finished_prompt_tokens: float = 0.0  # counter: prompt tokens of finished requests
    finished_requests: float = 0.0  # counter
    # vllm:request_prompt_tokens as read: cumulative {le: count}; None when not exported.
    prompt_buckets: Mapping[str, float] | None = None


def parse_engine_metrics(text: str, *, name: str, time: float, state: str = SERVING) -> EngineSample:
    """A vLLM /metrics page → an EngineSample (summed over vLLM's `engine` label: data-parallel ranks)."""
    totals = dict.fromkeys(
        (PROMPT_TOKENS, GENERATION_TOKENS, RUNNING, WAITING, REQUEST_PROMPT_SUM, REQUEST_PROMPT_COUNT), 0.0
    )
    seen = set()
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
                seen.add(sample.name)
            elif sample.name == REQUEST_PROMPT_BUCKET:
                le = _bound(sample.labels.get("le", "+Inf"))
                buckets[le] = buckets.get(le, 0.0) + sample.value
    missing = {PROMPT_TOKENS, GENERATION_TOKENS} - seen
    if missing:
        raise ValueError(f"engine {name} exports no {', '.join(sorted(missing))}")
    return EngineSample(
        name=name,
        time=time,
        prompt_tokens=totals[PROMPT_TOKENS],
        generation_tokens=totals[GENERATION_TOKENS],
        running=totals[RUNNING],
        waiting=totals[WAITING],
        state=state,
        finished_prompt_tokens=totals[REQUEST_PROMPT_SUM],
        finished_requests=totals[REQUEST_PROMPT_COUNT],
        prompt_buckets=buckets or None,
    )


def _bound(le: str) -> str:
    """One spelling per bucket bound ("2000", "2000.0" and "2e3" are one bucket)."""
    return "+Inf" if le in ("+Inf", "inf", "Inf") else str(float(le))


# -- the online fit ---------------------------------------------------------------------

# The preset's weight in the fit, in the units of a row (a row's parts add up
# to ~1, the interval): at first worth ~10 intervals, fading as they come.
PRIOR_WEIGHT = 1.0
RIDGE = 0.02
FORGET = 0.98  # each new interval discounts the old ones: ~50 intervals of memory
MAX_INTERVAL_SECONDS = 120.0
MIN_INTERVAL_SECONDS = 1.0
# The fit may move a preset by this factor at most either way: a runaway
# estimate would size the fleet absurdly; the feedback term covers the rest.
MAX_FACTOR = 4.0
RATE_SMOOTHING_SECONDS = 60.0  # time constant of the smoothed token rates
# The prompt-length histogram remembers finished requests over this time
# constant: long enough for a tail percentile to rest on hundreds of requests,
# short enough to follow a day whose prompts change.
PROMPT_LENGTH_MEMORY_SECONDS = 1800.0
PROMPT_LENGTH_MIN_REQUESTS = 50  # fewer say little about a tail percentile


@dataclass
class CalibrationState:
    """What calibration keeps between reconciles (status.scaling.calibration)."""

    # engine → [time, prompt, generated, running+waiting, finished prompt tokens, finished requests]
    last: dict[str, list[float]] = field(default_factory=dict)
    xx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])  # Σ x xᵀ (forgetting)
    xy: list[float] = field(default_factory=lambda: [0.0] * 3)  # Σ x · 1
    intervals: float = 0.0  # evidence seen, discounted like the sums
    prompt_rate: float | None = None  # prompt tokens/s over the fleet, smoothed
    generation_rate: float | None = None
    rates_at: float | None = None
    mean_prompt_tokens: float | None = None  # of finished requests, smoothed
    feedback: float = 1.0
    feedback_at: float | None = None
    ttft_buckets: dict[str, float] = field(default_factory=dict)  # last cumulative TTFT histogram seen
    calm_periods: int = 0  # feedback periods in a row with the TTFT percentile well under the SLO
    requests: float | None = None  # requests in flight, smoothed (smooth_requests)
    requests_at: float | None = None
    prompt_buckets: dict[str, dict[str, float]] = field(default_factory=dict)  # engine → last cumulative histogram
    prompt_lengths: dict[str, float] = field(default_factory=dict)  # fleet histogram, fading (cumulative)
    prompt_lengths_at: float | None = None
    # The TTFT feedback's memory of scale-ups that did not help (feedback).
    stall_ttft: float | None = None  # the percentile when the current streak over the SLO began
    stall_engines: int | None = None  # ready engines then
    stall_periods: int = 0  # periods over the SLO since
    stalled_since: float | None = None  # scale-ups did not help: the feedback adds no engine until under the SLO

    def to_dict(self) -> dict:
        return {
            "last": {name: list(v) for name, v in sorted(self.last.items())},
            "xx": [list(row) for row in self.xx],
            "xy": list(self.xy),
            "intervals": self.intervals,
            "promptRate": self.prompt_rate,
            "generationRate": self.generation_rate,
            "ratesAt": self.rates_at,
            "meanPromptTokens": self.mean_prompt_tokens,
            "feedback": self.feedback,
            "feedbackAt": self.feedback_at,
            "ttftBuckets": dict(self.ttft_buckets),
            "calmPeriods": self.calm_periods,
            "requests": self.requests,
            "requestsAt": self.requests_at,
            "promptBuckets": {name: dict(b) for name, b in sorted(self.prompt_buckets.items())},
            "promptLengths": dict(self.prompt_lengths),
            "promptLengthsAt": self.prompt_lengths_at,
            "stallTTFT": self.stall_ttft,
            "stallEngines": self.stall_engines,
            "stallPeriods": self.stall_periods,
            "stalledSince": self.stalled_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping | None) -> CalibrationState:
        """Read a stored state; anything malformed raises ValueError (the caller starts afresh)."""
        if not data:
            return cls()
        try:
            state = cls(
                last={str(k): [float(x) for x in v] for k, v in (data.get("last") or {}).items()},
                xx=[[float(x) for x in row] for row in data.get("xx") or [[0.0] * 3] * 3],
                xy=[float(x) for x in data.get("xy") or [0.0] * 3],
                intervals=float(data.get("intervals") or 0.0),
                prompt_rate=_optional(data.get("promptRate")),
                generation_rate=_optional(data.get("generationRate")),
                rates_at=_optional(data.get("ratesAt")),
                mean_prompt_tokens=_optional(data.get("meanPromptTokens")),
                feedback=float(data.get("feedback", 1.0)),
                feedback_at=_optional(data.get("feedbackAt")),
                ttft_buckets={str(k): float(v) for k, v in (data.get("ttftBuckets") or {}).items()},
                calm_periods=int(data.get("calmPeriods") or 0),
                requests=_optional(data.get("requests")),
                requests_at=_optional(data.get("requestsAt")),
                prompt_buckets={
                    str(name): {str(le): float(n) for le, n in b.items()}
                    for name, b in (data.get("promptBuckets") or {}).items()
                },
                prompt_lengths={str(le): float(n) for le, n in (data.get("promptLengths") or {}).items()},
                prompt_lengths_at=_optional(data.get("promptLengthsAt")),
                stall_ttft=_optional(data.get("stallTTFT")),
                stall_engines=None if data.get("stallEngines") is None else int(data["stallEngines"]),
                stall_periods=int(data.get("stallPeriods") or 0),
                stalled_since=_optional(data.get("stalledSince")),
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"calibration state is malformed: {error}") from None
        if len(state.xx) != 3 or any(len(row) != 3 for row in state.xx) or len(state.xy) != 3:
            raise ValueError("calibration state: xx must be 3×3 and xy 3 long")
        if any(len(v) != 6 for v in state.last.values()):
            raise ValueError("calibration state: each engine's last sample has 6 numbers")
        if not FEEDBACK_MIN <= state.feedback <= FEEDBACK_MAX:
            raise ValueError(f"calibration state: feedback {state.feedback} is outside its bounds")
        return state


def _optional(value) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What the autoscaler uses this reconcile, and why (for status)."""

    rates: EngineRates
    prompt_tokens_per_second: float | None  # arriving prompt work over the fleet, smoothed
    generation_tokens_per_second: float | None
    mean_prompt_tokens: float | None
    intervals: float  # evidence behind the fit (0: the preset alone)
    factors: tuple[float, float, float]  # fitted / preset: prefill time, step fixed cost, per-sequence cost
    feedback: float  # > 1: fewer engines (TTFT well under the SLO); < 1: more
    # Finished requests' prompt lengths over the fleet, fading ({le: count},
    # cumulative): prompt_tokens_at reads a percentile from it.
    prompt_lengths: Mapping[str, float] = field(default_factory=dict)

    def prompt_tokens_at(self, percentile: float, *, max_model_len: int | None = None) -> float | None:
        """The prompt length at this percentile (0..100) of the remembered
        finished requests; None with fewer than PROMPT_LENGTH_MIN_REQUESTS.
        Past the last bucket (vLLM's stop below max_model_len) it is
        interpolated up to max_model_len when known."""
        value, count = histogram_quantile({}, self.prompt_lengths, percentile / 100.0, top=max_model_len)
        return value if count >= PROMPT_LENGTH_MIN_REQUESTS else None

    def to_dict(self) -> dict:
        return {
            "rates": self.rates.to_dict(),
            "promptTokensPerSecond": None
            if self.prompt_tokens_per_second is None
            else round(self.prompt_tokens_per_second, 1),
            "generationTokensPerSecond": None
            if self.generation_tokens_per_second is None
            else round(self.generation_tokens_per_second, 1),
            "meanPromptTokens": None if self.mean_prompt_tokens is None else round(self.mean_prompt_tokens),
            "intervals": round(self.intervals, 1),
            "factors": [round(f, 3) for f in self.factors],
            "feedback": round(self.feedback, 3),
        }


def interval_row(previous: list[float], sample: EngineSample) -> tuple[list[float] | None, float, float]:
    """(fit row or None, prompt tokens, generated tokens) between two scrapes of one engine.

    The row is None when the interval must not be fitted: a counter went
    backwards (restart: not a negative rate), too short or too long, or the
    engine sat idle at either end. The token deltas are 0 after a restart.
    """
    then, prompt, generated, busy = previous[:4]
    elapsed = sample.time - then
    d_prompt, d_generated = sample.prompt_tokens - prompt, sample.generation_tokens - generated
    if d_prompt < 0 or d_generated < 0 or elapsed <= 0:
        return None, 0.0, 0.0
    now_busy = sample.running + sample.waiting
    if not MIN_INTERVAL_SECONDS <= elapsed <= MAX_INTERVAL_SECONDS or busy <= 0 or now_busy <= 0:
        return None, d_prompt, d_generated
    if d_prompt + d_generated <= 0:
        return None, d_prompt, d_generated
    batch = max(1.0, (busy + now_busy) / 2.0 if d_generated else 1.0)
    # Seconds spent, per unit of each parameter, relative to the interval.
    row = [d_prompt / elapsed, d_generated / batch / elapsed, d_generated / elapsed]
    return row, d_prompt, d_generated


def histogram_delta(previous: Mapping[str, float] | None, current: Mapping[str, float]) -> dict[str, float] | None:
    """What one engine's cumulative histogram ({le: count}) gained since its
    last reading; None when the readings cannot be compared: no earlier one,
    a count that fell or a bucket that went away (the engine restarted: its
    new counts are a fresh start, not a negative rate)."""
    if previous is None or set(previous) - set(current):
        return None
    delta = {le: current[le] - previous.get(le, 0.0) for le in current}
    return None if any(d < 0 for d in delta.values()) else delta


def fade_histogram(
    kept: Mapping[str, float],
    delta: Mapping[str, float],
    *,
    elapsed: float,
    memory: float = PROMPT_LENGTH_MEMORY_SECONDS,
) -> dict[str, float]:
    """The remembered histogram after `elapsed` seconds, old counts fading
    as exp(-elapsed / memory), plus what was just observed."""
    keep = math.exp(-max(0.0, elapsed) / memory)
    return {le: kept.get(le, 0.0) * keep + delta.get(le, 0.0) for le in set(kept) | set(delta)}


def _solve3(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (3×3, well conditioned by the prior)."""
    m = [row[:] + [v] for row, v in zip(a, b, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][3] / m[i][i] for i in range(3)]


def calibrate(
    state: CalibrationState | None, preset: EngineRates, samples: Iterable[EngineSample], *, now: float
) -> tuple[Calibration, CalibrationState]:
    """Fold this reconcile's engine scrapes into the fit; return the rates to use and the new state."""
    state = state or CalibrationState()
    last = dict(state.last)
    xx = [row[:] for row in state.xx]
    xy = state.xy[:]
    intervals = state.intervals
    scale = (preset.seconds_per_prompt_token, preset.decode_step_seconds, preset.seconds_per_sequence)
    prompt_sum = generated_sum = finished_tokens = finished = 0.0
    fresh = False
    seen = set()
    prompt_buckets = dict(state.prompt_buckets)
    lengths_delta: dict[str, float] = {}
    for sample in samples:
        seen.add(sample.name)
        if sample.state != SERVING:
            last.pop(sample.name, None)  # its numbers are not the serving rate; start afresh when it serves
            prompt_buckets.pop(sample.name, None)
            continue
        if sample.prompt_buckets is not None:
            delta = histogram_delta(prompt_buckets.get(sample.name), sample.prompt_buckets)
            prompt_buckets[sample.name] = dict(sample.prompt_buckets)
            for le, count in (delta or {}).items():
                lengths_delta[le] = lengths_delta.get(le, 0.0) + count
        previous = last.get(sample.name)
        last[sample.name] = [
            sample.time,
            sample.prompt_tokens,
            sample.generation_tokens,
            sample.running + sample.waiting,
            sample.finished_prompt_tokens,
            sample.finished_requests,
        ]
        if previous is None:
            continue
        d_tokens, d_finished = sample.finished_prompt_tokens - previous[4], sample.finished_requests - previous[5]
        if d_tokens >= 0 and d_finished > 0:  # a restart's negative delta says nothing
            finished_tokens += d_tokens
            finished += d_finished
        row, d_prompt, d_generated = interval_row(previous, sample)
        elapsed = sample.time - previous[0]
        if 0 < elapsed <= MAX_INTERVAL_SECONDS:
            prompt_sum += d_prompt / elapsed
            generated_sum += d_generated / elapsed
            fresh = True
        if row is None:
            continue
        x = [v * s for v, s in zip(row, scale, strict=True)]  # in units of the preset: prior at 1, 1, 1
        for i in range(3):
            xy[i] = FORGET * xy[i] + x[i]
            for j in range(3):
                xx[i][j] = FORGET * xx[i][j] + x[i] * x[j]
        intervals = FORGET * intervals + 1.0
    # Engines gone from the scrape are forgotten (the state stays as small as the fleet).
    last = {name: v for name, v in last.items() if name in seen}
    prompt_buckets = {name: b for name, b in prompt_buckets.items() if name in seen}
    prompt_lengths, prompt_lengths_at = state.prompt_lengths, state.prompt_lengths_at
    if lengths_delta or prompt_lengths:
        elapsed = 0.0 if prompt_lengths_at is None else now - prompt_lengths_at
        prompt_lengths, prompt_lengths_at = fade_histogram(prompt_lengths, lengths_delta, elapsed=elapsed), now

    prompt_rate, generation_rate, rates_at = state.prompt_rate, state.generation_rate, state.rates_at
    if fresh:
        weight = 1.0 if rates_at is None else 1.0 - math.exp(-max(0.0, now - rates_at) / RATE_SMOOTHING_SECONDS)
        prompt_rate = prompt_sum if prompt_rate is None else prompt_rate + weight * (prompt_sum - prompt_rate)
        generation_rate = (
            generated_sum if generation_rate is None else generation_rate + weight * (generated_sum - generation_rate)
        )
        rates_at = now

    mean_prompt = state.mean_prompt_tokens
    if finished:
        observed = finished_tokens / finished
        mean_prompt = observed if mean_prompt is None else mean_prompt + 0.2 * (observed - mean_prompt)

    # The preset is evidence that is forgotten like any interval (FORGET**n
    # of it is left after n intervals), down to a small ridge that keeps a
    # parameter the data cannot tell apart (a batch that never changes) at it.
    remembered = max(0.0, 1.0 - intervals * (1.0 - FORGET))
    prior = PRIOR_WEIGHT * remembered + RIDGE
    factors = _solve3(
        [[xx[i][j] + (prior if i == j else 0.0) for j in range(3)] for i in range(3)], [xy[i] + prior for i in range(3)]
    )
    factors = [min(MAX_FACTOR, max(1.0 / MAX_FACTOR, f)) for f in factors]
    rates = replace(
        preset,
        prefill_tokens_per_second=preset.prefill_tokens_per_second / factors[0],
        decode_step_seconds=preset.decode_step_seconds * factors[1],
        seconds_per_sequence=preset.seconds_per_sequence * factors[2],
        source=preset.source
        if intervals < 1
        else f"calibrated online from {intervals:.0f} intervals; prior {preset.source}",
    )
    new_state = replace(
        state,
        last=last,
        xx=xx,
        xy=xy,
        intervals=intervals,
        prompt_rate=prompt_rate,
        generation_rate=generation_rate,
        rates_at=rates_at,
        mean_prompt_tokens=mean_prompt,
        prompt_buckets=prompt_buckets,
        prompt_lengths=prompt_lengths,
        prompt_lengths_at=prompt_lengths_at,
    )
    return Calibration(
        rates=rates,
        prompt_tokens_per_second=prompt_rate,
        generation_tokens_per_second=generation_rate,
        mean_prompt_tokens=mean_prompt,
        intervals=intervals,
        factors=tuple(factors),
        feedback=state.feedback,
        prompt_lengths=prompt_lengths,
    ), new_state


# -- feedback on the observed TTFT ---------------------------------------------------------

FEEDBACK_MIN, FEEDBACK_MAX = 0.5, 1.5
FEEDBACK_PERIOD_SECONDS = 60.0
FEEDBACK_MIN_REQUESTS = 20  # fewer first tokens in a period say nothing about a percentile
FEEDBACK_UP, FEEDBACK_DOWN = 1.05, 0.85  # slow to give engines back, quick to add them
WELL_UNDER = 0.5  # the percentile under half the SLO counts as "well under"
# Fewer engines only after this many periods in a row well under the SLO: the
# TTFT percentile barely moves with spare capacity until the engines saturate,
# so one calm minute says nothing about room for the next burst; half an hour
# of calm minutes, bursts included, does.
CALM_PERIODS = 30
# Scale-ups that did not help: after this many periods in a row over the
# target, with this many more engines ready than when the streak began, a
# TTFT percentile still above this share of its value then did not respond
# to engines (prompts too long for the SLO, a slow dependency). The feedback
# then goes back to 1 and adds no engine until a period meets the target.
STALL_PERIODS = 5
STALL_GROWTH = 0.3
STALL_IMPROVEMENT = 0.9
STALL_HOLD_SECONDS = 3600.0  # a stall is remembered at least this long: no probing every few minutes


def histogram_quantile(
    previous: Mapping[str, float], current: Mapping[str, float], q: float, *, top: float | None = None
) -> tuple[float | None, float]:
    """The q-quantile (0..1) of what a cumulative histogram gained between two
    readings ({le: count}), as Prometheus' histogram_quantile interpolates it,
    and how many observations that was. A reset (a count that fell) gives
    (None, 0): the readings cannot be compared. With `top`, the +Inf bucket
    ends there (a prompt length: vLLM refuses prompts past max_model_len) and
    is interpolated like the others; without, a quantile in it is the last
    finite bound, a lower bound."""
    bounds = sorted(current, key=lambda le: math.inf if le == "+Inf" else float(le))
    deltas = [current[le] - previous.get(le, 0.0) for le in bounds]
    if any(d < 0 for d in deltas) or not deltas:
        return None, 0.0
    total = deltas[-1]
    if total <= 0:
        return None, 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in zip(bounds, deltas, strict=True):
        upper = math.inf if le == "+Inf" else float(le)
        if count >= rank:
            if upper == math.inf:
                if top is None or top <= lower:
                    return lower, total  # beyond the last finite bucket: its bound, as Prometheus does
                upper = top
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0), total
        lower, below = upper, count
    return lower, total


def feedback(
    state: CalibrationState,
    ttft_buckets: Mapping[str, float] | None,
    *,
    slo_seconds: float,
    percentile: float,
    now: float,
    engines: int | None = None,
    reachable: bool = True,
) -> tuple[float, str, CalibrationState]:
    """Once per FEEDBACK_PERIOD_SECONDS, compare the TTFT percentile observed
    since the last period (from the gateways' cumulative histogram, summed)
    with the target (`slo_seconds`: the SLO, or the reachable floor when the
    SLO is out of reach) and nudge the feedback factor: ×0.85 when over (more
    engines); ×1.05 (fewer) when under half of it, up to 1 at once, above 1
    only after CALM_PERIODS such periods in a row; unchanged otherwise, so it
    cannot chase noise nor spend the headroom kept for bursts. Bounded to
    [0.5, 1.5]. Engines that do not help are not added: while the SLO is out
    of reach (`reachable` False) the factor is at least 1, and when
    STALL_PERIODS over the target with STALL_GROWTH more `engines` ready did
    not improve the percentile, it goes back to 1 and stays there until a
    period meets the target. Returns (factor, note, state)."""
    if not reachable and state.feedback < 1.0:
        # The engines it added were for an SLO no fleet meets.
        state = replace(state, feedback=1.0, stall_ttft=None, stall_engines=None, stall_periods=0)
    if ttft_buckets is None:
        return state.feedback, "no TTFT histogram", state
    if state.feedback_at is not None and now - state.feedback_at < FEEDBACK_PERIOD_SECONDS:
        return state.feedback, "", state
    value, count = histogram_quantile(state.ttft_buckets, ttft_buckets, percentile / 100.0)
    factor, note, calm = state.feedback, "", state.calm_periods
    stall = (state.stall_ttft, state.stall_engines, state.stall_periods, state.stalled_since)
    if value is not None and count >= FEEDBACK_MIN_REQUESTS:
        ratio = value / slo_seconds
        calm = calm + 1 if ratio < WELL_UNDER else 0
        note = f"TTFT p{percentile:g} {value:.2f}s over {count:.0f} requests vs {slo_seconds:g}s"
        if ratio > 1.0:
            stall = over_target(stall, value, engines, now=now)
            if stall[3] is not None:
                factor = max(factor, 1.0)
                note += f"; more engines did not help (TTFT over the target since {stall[3]:.0f})"
            elif reachable or factor > 1.0:
                factor = max(FEEDBACK_MIN if reachable else 1.0, factor * FEEDBACK_DOWN)
        elif stall[3] is None or now - stall[3] >= STALL_HOLD_SECONDS:
            stall = (None, None, 0, None)
        if ratio < WELL_UNDER and (factor < 1.0 or calm >= CALM_PERIODS):
            # Back up to the model's size after any calm period; past it (fewer
            # engines than the model asks) only after sustained calm.
            ceiling = FEEDBACK_MAX if calm >= CALM_PERIODS else 1.0
            factor = min(ceiling, factor * FEEDBACK_UP)
    elif (
        value is None
        and count == 0
        and state.ttft_buckets
        and any(ttft_buckets.get(le, 0.0) < v for le, v in state.ttft_buckets.items())
    ):
        note = "TTFT histogram reset"
    return (
        factor,
        note,
        replace(
            state,
            feedback=factor,
            feedback_at=now,
            ttft_buckets=dict(ttft_buckets),
            calm_periods=calm,
            stall_ttft=stall[0],
            stall_engines=stall[1],
            stall_periods=stall[2],
            stalled_since=stall[3],
        ),
    )


Stall = tuple[float | None, int | None, int, float | None]  # (TTFT, engines) at the streak's start, periods, since


def over_target(stall: Stall, ttft: float, engines: int | None, *, now: float) -> Stall:
    """One more feedback period over the target: did the scale-ups since the
    streak began help? (pure; a table in tests/unit/test_calibration.py)"""
    start_ttft, start_engines, periods, since = stall
    if since is not None:
        return stall
    if start_ttft is None or start_engines is None or engines is None:
        # The streak begins here (engines None: some are still starting, the
        # scale-ups have not landed; judge from when they have).
        return (ttft, engines, 0, None)
    periods += 1
    grew = engines >= start_engines * (1.0 + STALL_GROWTH) and engines > start_engines
    if periods >= STALL_PERIODS and grew and ttft >= start_ttft * STALL_IMPROVEMENT:
        return (start_ttft, start_engines, periods, now)
    return (start_ttft, start_engines, periods, None)


# The requests in flight, averaged over this time constant before they size the
# decode part: the count is noisy (Poisson arrivals, queues that come and go),
# and the scale-down window keeps the highest recommendation for minutes, so
# an unsmoothed count pays for the top of the noise rather than for the load.
# A shorter scale-down window holds less noise and asks for a faster descent:
# the time constant is never longer than that window.
REQUESTS_SMOOTHING_SECONDS = 180.0


def requests_time_constant(scale_down_stabilization_seconds: float) -> float:
    return min(REQUESTS_SMOOTHING_SECONDS, scale_down_stabilization_seconds)


def smooth_requests(
    state: CalibrationState, requests: float | None, *, now: float, time_constant: float = REQUESTS_SMOOTHING_SECONDS
) -> tuple[float | None, CalibrationState]:
    """The requests in flight averaged exponentially over ``time_constant`` seconds
    (None when not observed: nothing to average, the state unchanged; 0: not averaged)."""
    if requests is None:
        return None, state
    if state.requests is None or state.requests_at is None or now < state.requests_at or time_constant <= 0:
        value = float(requests)  # first reading, or a clock that went back: start from what is seen
    else:
        weight = 1.0 - math.exp(-(now - state.requests_at) / time_constant)
        value = state.requests + weight * (requests - state.requests)
    return value, replace(state, requests=value, requests_at=now)
