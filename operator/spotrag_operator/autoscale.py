"""The autoscaling policy: queued tokens → how many engines (pure: no I/O, no kopf).

The operator's timer calls `decide` every reconcile with what it observed and
the small `AutoscalerState` it kept in the RAGDeployment's status; the
simulator (`spotrag simulate`) calls the very same function. The rules, in the
order they apply:

1. Stale or missing metric (`queued_tokens is None`): hold the current size.
   A scrape error never scales anything, least of all to the minimum.
2. Recommendation: ceil(queued tokens / target per engine). Inside the
   tolerance band (|load / capacity - 1| <= tolerance) the recommendation is
   the current size, so noise around the target never moves it.
3. The current size is the last decision, which counts engines still
   starting: capacity already on its way is never asked for twice.
4. Scale up on the lowest recommendation over `scaleUpStabilizationSeconds`
   (0 = at once); scale down only to the highest recommendation over
   `scaleDownStabilizationSeconds` (HPA's window: one quiet scrape after a
   burst does not give engines back).
5. The target swings at most `maxScaleUpStep` engines up per
   `scale_up_period_seconds`, however often the operator reconciles.
6. Bounds: never above `maxReplicas`, never below `minReplicas` nor the
   on-demand baseline (those engines are kept warm on purpose).

Every decision carries a machine reason (for the condition and Events) and a
sentence saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TOLERANCE = 0.10
# HPA's default scale-up policy period: the step cap holds per period, not per
# reconcile, because the operator also reconciles on every engine pod event.
DEFAULT_SCALE_UP_PERIOD_SECONDS = 15.0

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
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    on_demand_baseline: int
    target_queued_tokens_per_replica: float
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 300.0
    max_scale_up_step: int = 4
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_period_seconds: float = DEFAULT_SCALE_UP_PERIOD_SECONDS

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
        if not self.target_queued_tokens_per_replica > 0:
            problems.append(
                f"targetQueuedTokensPerReplica must be positive (got {self.target_queued_tokens_per_replica})"
            )
        if self.scale_up_stabilization_seconds < 0 or self.scale_down_stabilization_seconds < 0:
            problems.append("stabilization windows must not be negative")
        if self.max_scale_up_step < 1:
            problems.append(f"maxScaleUpStep must be at least 1 (got {self.max_scale_up_step})")
        if not 0 <= self.tolerance < 1:
            problems.append(f"tolerance must be in [0, 1) (got {self.tolerance})")
        if self.scale_up_period_seconds <= 0:
            problems.append("the scale-up period must be positive")
        if problems:
            raise InvalidScalingPolicy("invalid scaling settings: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, spec: dict, **overrides: float) -> ScalingPolicy:
        """From a RAGDeployment spec whose CRD defaults are filled in (crd.defaulted_spec)."""
        scaling = spec["scaling"]
        return cls(
            min_replicas=scaling["minReplicas"],
            max_replicas=scaling["maxReplicas"],
            on_demand_baseline=scaling["onDemandBaseline"],
            target_queued_tokens_per_replica=scaling["targetQueuedTokensPerReplica"],
            scale_up_stabilization_seconds=scaling["scaleUpStabilizationSeconds"],
            scale_down_stabilization_seconds=scaling["scaleDownStabilizationSeconds"],
            max_scale_up_step=scaling["maxScaleUpStep"],
            **overrides,
        )

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

    @property
    def changed(self) -> bool:
        return self.desired != self.previous


def recommend(queued_tokens: float, current: int, policy: ScalingPolicy) -> tuple[int, bool]:
    """Engines the queue needs, and whether it fell inside the tolerance band."""
    target = policy.target_queued_tokens_per_replica
    plain = math.ceil(queued_tokens / target)
    if plain != current and current > 0 and abs(queued_tokens / (target * current) - 1) <= policy.tolerance:
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
    raw, in_band = recommend(queued, current, policy)
    highs = _prune(state.highs, now, policy.scale_down_stabilization_seconds)
    lows = _prune(state.lows, now, policy.scale_up_stabilization_seconds)
    _push(highs, now, raw, keep_max=True)
    _push(lows, now, raw, keep_max=False)
    scale_ups = [(t, n) for t, n in state.scale_ups if now - policy.scale_up_period_seconds < t <= now]
    highest, lowest = highs[0][1], lows[0][1]

    need = f"{queued:.0f} queued tokens need {raw} engines at {policy.target_queued_tokens_per_replica:g} per engine"
    if observed.starting:
        need += f" ({observed.starting} of {capacity} still starting, counted as capacity)"
    if lowest > current:
        wanted, reason = lowest, SCALE_UP
        detail = (
            need
            if lowest == raw
            else f"{need}; lowest over the last {policy.scale_up_stabilization_seconds:g}s is {lowest}"
        )
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
        room = policy.max_scale_up_step - sum(n for _, n in scale_ups)
        allowed = current + max(0, room)
        if desired > allowed:
            desired, reason = allowed, SCALE_UP_LIMITED
            detail = f"{detail}; adding at most {policy.max_scale_up_step} per {policy.scale_up_period_seconds:g}s"
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
    return Decision(desired=desired, previous=current, reason=reason, message=message, recommendation=raw), new_state
