"""The autoscaling policy: queued tokens → how many engines (pure: no I/O, no kopf).

The operator's timer calls `decide` every reconcile with what it observed and
the small `AutoscalerState` it kept in the RAGDeployment's status; the
simulator (`spotrag simulate`) calls the very same function. The rules, in the
order they apply:

1. Stale or missing metric (`queued_tokens is None`): hold the current size.
   A scrape error never scales anything, least of all to the minimum.
2. Recommendation: the engines the queued work needs. With
   `targetQueuedTokensPerReplica` set, ceil(queued tokens / target) as
   before. Without it (the default) the work is weighed against the latency
   SLO (`engines_needed`): prompt tokens at the engine's prefill rate, output
   tokens at its decode rate for the batch it can run, with the rates
   calibrated from the engines (calibration.py). Inside the tolerance band
   (|load / capacity - 1| <= tolerance) the recommendation is the current
   size, so noise around the target never moves it.
3. The current size is the last decision, which counts engines still
   starting: capacity already on its way is never asked for twice.
4. Scale up on the lowest recommendation over `scaleUpStabilizationSeconds`
   (0 = at once); scale down only to the highest recommendation over
   `scaleDownStabilizationSeconds` (HPA's window: one quiet scrape after a
   burst does not give engines back).
5. The target swings up at most max(`maxScaleUpStep`, `maxScaleUpPercent`%
   of the current size) per `scale_up_period_seconds` (the HPA's
   "4 pods or 100%"), however often the operator reconciles.
6. Bounds: never above `maxReplicas`, never below `minReplicas` nor the
   on-demand baseline (those engines are kept warm on purpose).

Every decision carries a machine reason (for the condition and Events) and a
sentence saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .calibration import (
    Calibration,
    CalibrationState,
    EngineRates,
    EngineSample,
    calibrate,
    feedback,
    rates_from_spec,
    requests_time_constant,
    smooth_requests,
)

DEFAULT_TOLERANCE = 0.10
# HPA's default scale-up policy period: the step cap holds per period, not per
# reconcile, because the operator also reconciles on every engine pod event.
DEFAULT_SCALE_UP_PERIOD_SECONDS = 15.0
# Without the gateways' prompt/output split (an older gateway) and without an
# explicit target, queued tokens are sized at the old default per engine.
FALLBACK_TARGET_QUEUED_TOKENS = 2048
# Sizing to the SLO: the prompt backlog must be prefilled within this share of
# the TTFT SLO (the newest request waits for the backlog ahead of it, and more
# arrives meanwhile).
BACKLOG_SHARE = 0.5
# Requests in flight unknown: an answer's allowance (max_tokens) guessed at this.
OUTPUT_TOKENS_PER_REQUEST_GUESS = 256

# Decision reasons (CamelCase, as Kubernetes condition reasons and Events).
SCALE_UP = "ScaleUp"
SCALE_UP_LIMITED = "ScaleUpLimited"
SCALE_DOWN = "ScaleDown"
SCALE_DOWN_STABILIZING = "ScaleDownStabilizing"
WITHIN_TOLERANCE = "WithinTolerance"
STEADY = "Steady"
AT_MAXIMUM = "AtMaximum"
AT_FLOOR = "AtFloor"
METRIC_UNAVAILABLE = "MetricUnavailable"


class InvalidScalingPolicy(ValueError):
    """The scaling settings cannot be acted on (the CRD normally refuses them first)."""


@dataclass(frozen=True, kw_only=True)
class Slo:
    """The latency the fleet is sized for (spec.scaling.slo)."""

    ttft_seconds: float = 2.0
    percentile: float = 95.0
    inter_token_latency_seconds: float | None = None
    # How busy the steady work may keep the engines: new ones take minutes to
    # arrive, and the running ones must absorb the load's growth meanwhile.
    target_utilization: float = 0.5

    def __post_init__(self) -> None:
        if not self.ttft_seconds > 0:
            raise InvalidScalingPolicy(f"slo.ttftSeconds must be positive (got {self.ttft_seconds})")
        if not 0 < self.percentile <= 100:
            raise InvalidScalingPolicy(f"slo.percentile must be in (0, 100] (got {self.percentile})")
        if not 0 < self.target_utilization <= 1:
            raise InvalidScalingPolicy(f"slo.targetUtilization must be in (0, 1] (got {self.target_utilization})")
        if self.inter_token_latency_seconds is not None and not self.inter_token_latency_seconds > 0:
            raise InvalidScalingPolicy(
                f"slo.interTokenLatencySeconds must be positive (got {self.inter_token_latency_seconds})"
            )


@dataclass(frozen=True, kw_only=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    on_demand_baseline: int
    target_queued_tokens_per_replica: float | None = None  # None: sized to the SLO
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 300.0
    max_scale_up_step: int = 4
    max_scale_up_percent: float = 0.0  # 0: the fixed step alone (as before); the CRD defaults it to 100
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_period_seconds: float = DEFAULT_SCALE_UP_PERIOD_SECONDS
    slo: Slo = field(default_factory=lambda: Slo())
    engine_rates: EngineRates | None = None  # the preset before calibration; None: calibration.DEFAULT_PRESET
    max_inflight_tokens_per_engine: int | None = None  # the gateway's cap on one engine's work
    calibrate_online: bool = True  # False: the preset's rates only (scaling.calibration.online)
    max_model_len: int | None = None  # the engines' context: the longest prompt they take

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0:
            problems.append(f"minReplicas must not be negative (got {self.min_replicas})")
        if self.max_replicas < 1:
            problems.append(f"maxReplicas must be at least 1 (got {self.max_replicas})")
        if self.min_replicas > self.max_replicas:
            problems.append(f"minReplicas {self.min_replicas} exceeds maxReplicas {self.max_replicas}")
        if not 0 <= self.on_demand_baseline <= self.max_replicas:
            problems.append(
                f"onDemandBaseline must be in 0..maxReplicas ({self.max_replicas}), got {self.on_demand_baseline}"
            )
        if self.target_queued_tokens_per_replica is not None and not self.target_queued_tokens_per_replica > 0:
            problems.append(
                f"targetQueuedTokensPerReplica must be positive (got {self.target_queued_tokens_per_replica})"
            )
        if self.scale_up_stabilization_seconds < 0 or self.scale_down_stabilization_seconds < 0:
            problems.append("stabilization windows must not be negative")
        if self.max_scale_up_step < 1:
            problems.append(f"maxScaleUpStep must be at least 1 (got {self.max_scale_up_step})")
        if not 0 <= self.tolerance < 1:
            problems.append(f"tolerance must be in [0, 1) (got {self.tolerance})")
        if self.max_scale_up_percent < 0:
            problems.append(f"maxScaleUpPercent must not be negative (got {self.max_scale_up_percent})")
        if self.scale_up_period_seconds <= 0:
            problems.append("the scale-up period must be positive")
        if problems:
            raise InvalidScalingPolicy("invalid scaling settings: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, spec: dict, **overrides: float) -> ScalingPolicy:
        """From a RAGDeployment spec whose CRD defaults are filled in (crd.defaulted_spec)."""
        scaling = spec["scaling"]
        slo = scaling.get("slo") or {}
        try:
            rates = rates_from_spec(scaling.get("calibration"))
        except (ValueError, TypeError) as error:
            raise InvalidScalingPolicy(f"invalid scaling.calibration: {error}") from None
        return cls(
            min_replicas=scaling["minReplicas"],
            max_replicas=scaling["maxReplicas"],
            on_demand_baseline=scaling["onDemandBaseline"],
            target_queued_tokens_per_replica=scaling.get("targetQueuedTokensPerReplica"),
            scale_up_stabilization_seconds=scaling["scaleUpStabilizationSeconds"],
            scale_down_stabilization_seconds=scaling["scaleDownStabilizationSeconds"],
            max_scale_up_step=scaling["maxScaleUpStep"],
            max_scale_up_percent=scaling.get("maxScaleUpPercent", 0),
            slo=Slo(
                ttft_seconds=float(slo.get("ttftSeconds", 2.0)),
                percentile=float(slo.get("percentile", 95.0)),
                inter_token_latency_seconds=slo.get("interTokenLatencySeconds"),
                target_utilization=float(slo.get("targetUtilization", 0.5)),
            ),
            engine_rates=rates,
            max_inflight_tokens_per_engine=(spec.get("gateway") or {}).get("maxInflightTokensPerEngine"),
            calibrate_online=(scaling.get("calibration") or {}).get("online", True),
            max_model_len=(spec.get("model") or {}).get("maxModelLen"),
            **overrides,
        )

    @property
    def rates(self) -> EngineRates:
        return self.engine_rates or rates_from_spec(None)

    @property
    def floor(self) -> int:
        """Fewest engines ever wanted: the minimum, and the on-demand baseline kept warm."""
        return min(max(self.min_replicas, self.on_demand_baseline), self.max_replicas)


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the operator saw this reconcile."""

    now: float  # seconds (epoch in the operator, simulated time in the simulator)
    queued_tokens: float | None  # summed over gateways; None when stale or missing
    ready: int  # serving engines
    starting: int  # created, not ready yet (Pending or loading the model)
    draining: int = 0  # leaving; never counted as capacity
    metric_problem: str = ""  # why queued_tokens is None, for the message
    # The two parts of queued_tokens (gateways' spotrag_queued_prompt_tokens /
    # _output_tokens); None from a gateway that does not split them.
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    requests: float | None = None  # in flight: waiting in the gateways + running/waiting on engines
    calibration: Calibration | None = None  # this reconcile's rates (calibration.calibrate); None: the preset

    def __post_init__(self) -> None:
        if min(self.ready, self.starting, self.draining) < 0:
            raise ValueError("engine counts must not be negative")
        if self.queued_tokens is not None and (self.queued_tokens < 0 or math.isnan(self.queued_tokens)):
            raise ValueError(f"queued_tokens must be a non-negative number or None, got {self.queued_tokens!r}")


@dataclass
class AutoscalerState:
    """What `decide` remembers between reconciles; small and JSON-serialisable.

    `highs` and `lows` are monotonic queues of (time, recommendation): `highs`
    keeps only entries that can still be the maximum of the scale-down window
    (values strictly decreasing), `lows` those that can still be the minimum of
    the scale-up window. So the state stays a handful of pairs however often
    the operator reconciles.
    """

    desired: int | None = None
    last_scale_time: float | None = None
    highs: list[tuple[float, int]] = field(default_factory=list)
    lows: list[tuple[float, int]] = field(default_factory=list)
    scale_ups: list[tuple[float, int]] = field(default_factory=list)  # (time, engines added)

    def to_dict(self) -> dict:
        return {
            "desired": self.desired,
            "lastScaleTime": self.last_scale_time,
            "highs": [[t, n] for t, n in self.highs],
            "lows": [[t, n] for t, n in self.lows],
            "scaleUps": [[t, n] for t, n in self.scale_ups],
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> AutoscalerState:
        """Read a stored state; anything malformed raises ValueError (the caller starts afresh)."""
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"autoscaler state must be an object, got {type(data).__name__}")

        def pairs(key: str) -> list[tuple[float, int]]:
            raw = data.get(key) or []
            try:
                return [(float(t), int(n)) for t, n in raw]
            except (TypeError, ValueError):
                raise ValueError(
                    f"autoscaler state {key!r} must be a list of [time, count] pairs, got {raw!r}"
                ) from None

        desired = data.get("desired")
        last = data.get("lastScaleTime")
        if desired is not None and (not isinstance(desired, int) or desired < 0):
            raise ValueError(f"autoscaler state 'desired' must be a non-negative integer, got {desired!r}")
        if last is not None and not isinstance(last, (int, float)):
            raise ValueError(f"autoscaler state 'lastScaleTime' must be a number, got {last!r}")
        return cls(
            desired=desired, last_scale_time=last, highs=pairs("highs"), lows=pairs("lows"), scale_ups=pairs("scaleUps")
        )


@dataclass(frozen=True, kw_only=True)
class Decision:
    desired: int
    previous: int
    reason: str
    message: str
    recommendation: int | None  # from the metric alone, before windows and bounds
    need: Need | None = None  # how the recommendation was sized (None: metric unavailable)

    @property
    def changed(self) -> bool:
        return self.desired != self.previous


@dataclass(frozen=True, kw_only=True)
class Need:
    """Engines the work needs (a fraction), and the parts it is made of."""

    engines: float
    prefill_flow: float = 0.0  # the prompt tokens arriving per second, at the prefill rate
    prefill_backlog: float = 0.0  # the queued prompt tokens, to prefill within BACKLOG_SHARE of the TTFT SLO
    decode: float = 0.0  # the requests in flight, at the batch one engine can run
    batch: float = 0.0
    feedback: float = 1.0
    how: str = ""  # one sentence: what was weighed and how
    target: float | None = None  # queued tokens per engine, when sized on a target rather than the SLO

    def to_dict(self) -> dict:
        """For status: the target in use and why."""
        if self.target is not None:
            return {"basis": "targetQueuedTokensPerReplica", "targetQueuedTokensPerReplica": self.target}
        return {
            "basis": "slo",
            "engines": round(self.engines, 2),
            "prefillFlow": round(self.prefill_flow, 2),
            "prefillBacklog": round(self.prefill_backlog, 2),
            "decode": round(self.decode, 2),
            "batch": round(self.batch, 1),
            "feedback": round(self.feedback, 3),
        }


def engines_needed(
    *,
    prompt_tokens: float,
    output_tokens: float,
    requests: float | None,
    rates: EngineRates,
    slo: Slo,
    prompt_tokens_per_second: float | None = None,
    feedback: float = 1.0,
    max_inflight_tokens_per_engine: int | None = None,
    mean_prompt_tokens: float | None = None,
) -> Need:
    """Engines needed so the queued work meets the SLO (pure; tables in tests/unit/test_calibration.py).

    steady work, at `slo.target_utilization` of the engines:
      prefill flow: the prompt tokens/s the engines prefill (calibrated), at
      the prefill rate;
      decode: the requests in flight over the batch one engine can run
      (vLLM's max_num_seqs, its KV cache for a request of the mean prompt
      plus its output, the gateway's token cap per engine and, with an
      inter-token latency SLO, the batch whose step meets it);
    plus the prompt backlog, prefilled within BACKLOG_SHARE of the TTFT SLO
    (a burst asks for its engines in one go). Divided by the feedback factor
    (calibration.feedback).
    """
    prompt_seconds = rates.seconds_per_prompt_token
    busy = slo.target_utilization
    flow = (prompt_tokens_per_second or 0.0) * prompt_seconds / busy
    backlog = prompt_tokens * prompt_seconds / (BACKLOG_SHARE * slo.ttft_seconds)
    if requests is None:
        requests = output_tokens / OUTPUT_TOKENS_PER_REQUEST_GUESS
    per_request = None
    if requests > 0:
        # A request holds its whole prompt in the KV cache, not only the part still queued.
        prompt = mean_prompt_tokens if mean_prompt_tokens else prompt_tokens / requests
        per_request = prompt + output_tokens / requests
    batch = rates.batch_for(inter_token_latency=slo.inter_token_latency_seconds, tokens_per_request=per_request)
    if max_inflight_tokens_per_engine and per_request:
        batch = max(1.0, min(batch, max_inflight_tokens_per_engine / per_request))
    decode = requests / (batch * busy)
    engines = (flow + backlog + decode) / feedback
    how = (
        f"prefill {flow + backlog:.2f} ({(prompt_tokens_per_second or 0):.0f} prompt tok/s and {prompt_tokens:.0f} "
        f"queued at {rates.prefill_tokens_per_second:.0f} tok/s) + decode {decode:.2f} ({requests:.0f} requests, "
        f"{batch:.0f} per engine at a {rates.step_seconds(batch) * 1000:.0f} ms step)"
    )
    if feedback != 1.0:
        how += f", ÷ {feedback:.2f} for the observed TTFT"
    return Need(
        engines=engines,
        prefill_flow=flow,
        prefill_backlog=backlog,
        decode=decode,
        batch=batch,
        feedback=feedback,
        how=how,
    )


def need_for(policy: ScalingPolicy, observed: Observation) -> Need:
    """What the observation needs under the policy: an explicit target, the SLO, or the fallback."""
    queued = observed.queued_tokens or 0.0
    target = policy.target_queued_tokens_per_replica
    split = observed.prompt_tokens is not None and observed.output_tokens is not None
    if target is None and split:
        calibration = observed.calibration
        rates = calibration.rates if calibration else policy.rates
        return engines_needed(
            prompt_tokens=observed.prompt_tokens,
            output_tokens=observed.output_tokens,
            requests=observed.requests,
            rates=rates,
            slo=policy.slo,
            prompt_tokens_per_second=calibration.prompt_tokens_per_second if calibration else None,
            feedback=calibration.feedback if calibration else 1.0,
            max_inflight_tokens_per_engine=policy.max_inflight_tokens_per_engine,
            mean_prompt_tokens=calibration.mean_prompt_tokens if calibration else None,
        )
    if target is None:
        target, note = FALLBACK_TARGET_QUEUED_TOKENS, " (the gateways export no prompt/output split)"
    else:
        note = ""
    return Need(engines=queued / target, how=note, target=target)


# An SLO out of reach: the fleet is sized and steered to one prefill of the
# percentile prompt plus this headroom (queueing, the decode steps a prefill
# shares its steps with), the lowest TTFT percentile it can hold.
FLOOR_HEADROOM = 0.25


@dataclass(frozen=True, kw_only=True)
class Reach:
    """Whether any fleet can meet the TTFT SLO, and what the fleet is steered to."""

    reachable: bool
    target_seconds: float  # the SLO, or (out of reach) the reachable floor with FLOOR_HEADROOM
    prompt_tokens: float | None = None  # at the SLO's percentile (or the mean, before the histogram says)
    prefill_seconds: float | None = None  # one prefill of them at the calibrated rate
    message: str | None = None  # out of reach: why, with the numbers


def slo_reach(
    slo: Slo, rates: EngineRates, *, percentile_prompt_tokens: float | None, mean_prompt_tokens: float | None = None
) -> Reach:
    """An SLO no fleet can meet (pure; a table in tests/unit/test_calibration.py).

    A request's TTFT is at least one prefill of its prompt, and a longer
    prompt takes longer, so the TTFT at the SLO's percentile is at least one
    prefill of the prompt at that percentile (vllm:request_prompt_tokens). When
    that alone exceeds the TTFT target, more engines cannot meet the SLO:
    accepted (the fleet still scales) but shown in a condition, and the fleet
    is sized to the floor instead (`target_seconds`). Before the histogram
    holds enough requests, the mean prompt (a weaker check) is used."""
    tokens, basis = percentile_prompt_tokens, f"the p{slo.percentile:g} prompt"
    if tokens is None:
        tokens, basis = mean_prompt_tokens, "the mean prompt"
    if not tokens:
        return Reach(reachable=True, target_seconds=slo.ttft_seconds)
    prefill = tokens * rates.seconds_per_prompt_token
    if prefill < slo.ttft_seconds:
        return Reach(reachable=True, target_seconds=slo.ttft_seconds, prompt_tokens=tokens, prefill_seconds=prefill)
    floor = prefill * (1.0 + FLOOR_HEADROOM)
    # Rounded so the condition's message does not change every reconcile.
    message = (
        f"the TTFT SLO of {slo.ttft_seconds:g}s is below one prefill of {basis}: {_round_to(tokens, 100):.0f} tokens "
        f"at {_round_to(rates.prefill_tokens_per_second, 100):.0f} tok/s take {prefill:.1f}s on any engine; more "
        f"engines cannot meet it, so the fleet is sized for a TTFT p{slo.percentile:g} of {floor:.1f}s "
        f"(that prefill + {FLOOR_HEADROOM:.0%})"
    )
    return Reach(reachable=False, target_seconds=floor, prompt_tokens=tokens, prefill_seconds=prefill, message=message)


def _round_to(value: float, step: float) -> float:
    return round(value / step) * step if value >= step else value


def recommend(queued_tokens: float, current: int, policy: ScalingPolicy) -> tuple[int, bool]:
    """Engines the queue needs at an explicit target, and whether it fell inside the tolerance band."""
    target = policy.target_queued_tokens_per_replica or FALLBACK_TARGET_QUEUED_TOKENS
    return _round(queued_tokens / target, current, policy)


def _round(engines: float, current: int, policy: ScalingPolicy) -> tuple[int, bool]:
    # A hair above a whole number is that number: float noise must not add an engine.
    plain = max(0, math.ceil(engines - 1e-9))
    if plain != current and current > 0 and abs(engines / current - 1) <= policy.tolerance:
        return current, True
    return plain, False


def _push(queue: list[tuple[float, int]], now: float, value: int, *, keep_max: bool) -> None:
    # Drop entries the new value dominates for the rest of their life in the window.
    while queue and (queue[-1][1] <= value if keep_max else queue[-1][1] >= value):
        queue.pop()
    queue.append((now, value))


def _prune(queue: list[tuple[float, int]], now: float, window: float) -> list[tuple[float, int]]:
    # Entries from the future (a clock that went back) are not to be trusted either.
    return [(t, n) for t, n in queue if now - window <= t <= now]


def scale_up_step(policy: ScalingPolicy, size: int) -> int:
    """Engines that may be added per period from `size` (the size when the period began):
    the HPA's max(N pods, P%), so a burst at the floor gets what it needs in one or two steps."""
    return max(policy.max_scale_up_step, math.ceil(size * policy.max_scale_up_percent / 100.0))


def decide(
    policy: ScalingPolicy, observed: Observation, state: AutoscalerState | None = None
) -> tuple[Decision, AutoscalerState]:
    """One autoscaling decision and the state to keep for the next one."""
    state = state or AutoscalerState()
    now = observed.now
    capacity = observed.ready + observed.starting
    # Without a remembered decision (first run, lost state) adopt what runs.
    current = state.desired if state.desired is not None else min(max(capacity, policy.floor), policy.max_replicas)

    if observed.queued_tokens is None:
        why = f" ({observed.metric_problem})" if observed.metric_problem else ""
        held = min(max(current, policy.floor), policy.max_replicas)
        new_state = AutoscalerState(
            desired=held,
            last_scale_time=state.last_scale_time,
            highs=list(state.highs),
            lows=list(state.lows),
            scale_ups=list(state.scale_ups),
        )
        return Decision(
            desired=held,
            previous=current,
            reason=METRIC_UNAVAILABLE,
            message=f"queued tokens unavailable{why}; holding {held} engines",
            recommendation=None,
        ), new_state

    queued = observed.queued_tokens
    need = need_for(policy, observed)
    raw, in_band = _round(need.engines, current, policy)
    highs = _prune(state.highs, now, policy.scale_down_stabilization_seconds)
    lows = _prune(state.lows, now, policy.scale_up_stabilization_seconds)
    _push(highs, now, raw, keep_max=True)
    _push(lows, now, raw, keep_max=False)
    scale_ups = [(t, n) for t, n in state.scale_ups if now - policy.scale_up_period_seconds < t <= now]
    highest, lowest = highs[0][1], lows[0][1]
    from_zero = current == 0 and raw > 0
    if from_zero:
        # Scaled to zero and work arrived: the gateways hold it until an engine
        # starts, so the first engine is asked for now, whatever the window says.
        lowest = max(lowest, 1)

    sized = need
    if need.target is not None:
        need = f"{queued:.0f} queued tokens need {raw} engines at {need.target:g} per engine{need.how}"
    else:
        need = f"{need.how}: {raw} engines"
    if observed.starting:
        need += f" ({observed.starting} of {capacity} still starting, counted as capacity)"
    if lowest > current:
        wanted, reason = lowest, SCALE_UP
        detail = (
            need
            if lowest == raw
            else f"{need}; lowest over the last {policy.scale_up_stabilization_seconds:g}s is {lowest}"
        )
        if from_zero:
            detail = f"scaling from zero at once (requests are held until an engine is ready): {detail}"
    elif highest < current:
        wanted, reason = highest, SCALE_DOWN
        detail = (
            need
            if highest == raw
            else f"{need}; highest over the last {policy.scale_down_stabilization_seconds:g}s is {highest}"
        )
    else:
        wanted = current
        if in_band:
            reason, detail = (
                WITHIN_TOLERANCE,
                f"{queued:.0f} queued tokens are within {policy.tolerance:.0%} of the target for {current} engines",
            )
        elif raw < current:
            reason, detail = (
                SCALE_DOWN_STABILIZING,
                f"{need}, but {highest} were needed within the last {policy.scale_down_stabilization_seconds:g}s",
            )
        elif raw > current:
            reason, detail = (
                SCALE_UP_LIMITED,
                f"{need}, but only {lowest} over the last {policy.scale_up_stabilization_seconds:g}s",
            )
        else:
            reason, detail = STEADY, need

    desired = wanted
    if desired > policy.max_replicas:
        desired, reason, detail = (
            policy.max_replicas,
            AT_MAXIMUM,
            f"{detail}; capped at maxReplicas {policy.max_replicas}",
        )
    if desired < policy.floor:
        desired, reason, detail = (
            policy.floor,
            AT_FLOOR,
            f"{detail}; kept at {policy.floor} (minReplicas {policy.min_replicas}, on-demand baseline {policy.on_demand_baseline})",
        )
    if desired > current:
        step = scale_up_step(policy, current - sum(n for _, n in scale_ups))
        room = step - sum(n for _, n in scale_ups)
        allowed = current + max(0, room)
        if desired > allowed:
            desired, reason = allowed, SCALE_UP_LIMITED
            detail = f"{detail}; adding at most {step} per {policy.scale_up_period_seconds:g}s"
        if desired > current:
            scale_ups.append((now, desired - current))

    changed = desired != current
    message = f"{detail}: {current} → {desired}" if changed else f"{detail}; keeping {desired}"
    new_state = AutoscalerState(
        desired=desired,
        last_scale_time=now if changed else state.last_scale_time,
        highs=highs,
        lows=lows,
        scale_ups=scale_ups,
    )
    return Decision(
        desired=desired, previous=current, reason=reason, message=message, recommendation=raw, need=sized
    ), new_state


@dataclass(frozen=True, kw_only=True)
class ScalingStep:
    """One reconcile's scaling: the decision, the rates it used, and what to report."""

    decision: Decision
    calibration: Calibration
    slo_problem: str | None  # an SLO no engine can meet (for a condition), else None
    feedback_note: str  # what the TTFT feedback saw this period ("" when it did not look)
    reach: Reach | None = None

    def sizing_status(self) -> dict:
        """For status.sizing: the basis and parts of the last recommendation, the rates and why."""
        need = self.decision.need.to_dict() if self.decision.need else {"basis": "unavailable"}
        extra = {}
        if self.reach and self.reach.prompt_tokens is not None:
            extra["promptTokensAtPercentile"] = round(self.reach.prompt_tokens)
            extra["ttftTargetSeconds"] = round(self.reach.target_seconds, 2)
        if self.slo_problem:
            extra["sloProblem"] = self.slo_problem
        return need | self.calibration.to_dict() | extra


def scale(
    policy: ScalingPolicy,
    observed: Observation,
    *,
    samples: list[EngineSample],
    ttft_buckets: dict[str, float] | None,
    autoscaler: AutoscalerState | None,
    calibration_state: CalibrationState | None,
) -> tuple[ScalingStep, AutoscalerState, CalibrationState]:
    """calibrate → feedback → decide, once: what the operator runs every reconcile
    and the simulator every control interval (the same function, so the
    simulator shows what the operator does)."""
    state = calibration_state or CalibrationState()
    if policy.calibrate_online:
        result, state = calibrate(state, policy.rates, samples, now=observed.now)
    else:
        result, _ = calibrate(CalibrationState(), policy.rates, [], now=observed.now)
    reach = Reach(reachable=True, target_seconds=policy.slo.ttft_seconds)
    if policy.target_queued_tokens_per_replica is None:
        reach = slo_reach(
            policy.slo,
            result.rates,
            percentile_prompt_tokens=result.prompt_tokens_at(policy.slo.percentile, max_model_len=policy.max_model_len),
            mean_prompt_tokens=result.mean_prompt_tokens,
        )
    factor, note, state = feedback(
        state,
        ttft_buckets,
        slo_seconds=reach.target_seconds,
        percentile=policy.slo.percentile,
        now=observed.now,
        engines=None if observed.starting else observed.ready,
        reachable=reach.reachable,
    )
    result = Calibration(**{**result.__dict__, "feedback": factor})
    requests, state = smooth_requests(
        state,
        observed.requests,
        now=observed.now,
        time_constant=requests_time_constant(policy.scale_down_stabilization_seconds),
    )
    observed = Observation(**{**observed.__dict__, "requests": requests})
    sized_policy = policy
    if not reach.reachable:
        # Sized as if the SLO were the floor: the backlog drains within it.
        sized_policy = replace(policy, slo=replace(policy.slo, ttft_seconds=reach.target_seconds))
    decision, autoscaler_state = decide(sized_policy, _with_calibration(observed, result), autoscaler)
    return (
        ScalingStep(decision=decision, calibration=result, slo_problem=reach.message, feedback_note=note, reach=reach),
        (autoscaler_state),
        state,
    )


def _with_calibration(observed: Observation, result: Calibration) -> Observation:
    return Observation(**{**observed.__dict__, "calibration": result})


def observation_from(
    work,
    samples: list[EngineSample],
    *,
    now: float,
    ready: int,
    starting: int,
    draining: int = 0,
    metric_problem: str = "",
) -> Observation:
    """An Observation from the gateways' reading (queued_tokens.QueuedWork, or None
    when it failed) and the engines' samples: the requests in flight are those
    waiting in the gateways plus those running or waiting on the engines."""
    if work is None:
        return Observation(
            now=now,
            queued_tokens=None,
            ready=ready,
            starting=starting,
            draining=draining,
            metric_problem=metric_problem,
        )
    requests = None
    if work.waiting_requests is not None:
        requests = work.waiting_requests + sum(s.running + s.waiting for s in samples)
    return Observation(
        now=now,
        queued_tokens=work.tokens,
        ready=ready,
        starting=starting,
        draining=draining,
        metric_problem=metric_problem,
        prompt_tokens=work.prompt_tokens,
        output_tokens=work.output_tokens,
        requests=requests,
    )
