"""The policies compared: spotrag (the operator's real code) and the baselines.

Each controller looks at the simulated cluster every `interval` seconds and
says how many engines it wants. spotrag's controllers call
`spotrag_operator.autoscale.decide` and `spotrag_operator.placement.place`,
unchanged, exactly as the operator's timer does. The baselines are written
after the projects they stand for:

- on-demand for peak: the smallest fixed on-demand fleet that meets the SLO
  in the trace's busiest minutes (run.peak_fleet searches for it);
- KubeAI: in-flight requests averaged over a moving window / targetRequests
  (internal/modelautoscaler), scale-down after consecutive lower answers;
- KEDA on vLLM's `num_requests_waiting`: the HPA algorithm on a threshold of
  waiting requests per replica.

The baselines run without spotrag's gateway (requests wait in each vLLM's
own queue, and die with its pod) and on a node pool that takes spot when it
can and falls back to on-demand at once when it cannot (Karpenter with both
capacity types), above the same on-demand baseline. With spot off (the
spec's spot.enabled, as for spotrag) their node pool is on-demand only.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from spotrag_operator import autoscale, placement
from spotrag_operator.autoscale import AutoscalerState, Observation, ScalingPolicy
from spotrag_operator.calibration import CalibrationState
from spotrag_operator.placement import EngineView, PlacementState, SpotSettings

from .presets import KedaSettings, KubeAISettings


@dataclass(frozen=True)
class Target:
    desired: int
    by_capacity: dict[str, int] | None = None  # None: the node pool picks (spot if it can)
    give_up: tuple[str, ...] = ()


def node_pool(desired: int, spot: SpotSettings) -> Target:
    """A baseline's target: with spot on, its node pool picks each node's
    capacity (spot when there is any, the simulation decides); with spot off,
    every engine on on-demand, as spotrag's placement splits it then."""
    if spot.enabled:
        return Target(desired=desired)
    return Target(desired=desired, by_capacity={placement.ON_DEMAND: desired, placement.SPOT: 0})


@dataclass(frozen=True)
class ClusterView:
    """What a controller may observe."""

    now: float
    engines: list[EngineView]  # live and draining engines
    queued_tokens: float  # spotrag's gateway gauge
    in_flight_requests: int  # KubeAI's proxy count
    waiting_requests: int  # vllm:num_requests_waiting summed over engines
    prompt_tokens: float | None = None  # the prompt part of queued_tokens (spotrag_queued_prompt_tokens)
    output_tokens: float | None = None
    engine_samples: list = field(default_factory=list)  # calibration.EngineSample per ready or draining engine
    ttft_buckets: dict | None = None  # the gateway's cumulative TTFT histogram

    def count(self, phase: str) -> int:
        return sum(1 for e in self.engines if e.phase == phase)


class Controller(Protocol):
    name: str
    uses_gateway: bool
    interval: float | None

    def initial(self) -> Target: ...

    def control(self, view: ClusterView) -> Target: ...


@dataclass
class DecisionLog:
    changes: int = 0
    reasons: Counter = field(default_factory=Counter)
    placements: Counter = field(default_factory=Counter)
    give_ups: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (time, desired) at each change
    feedback_changes: int = 0  # how often the TTFT feedback factor moved (flapping shows here)
    last_feedback: float = 1.0
    last_calibration: object = None  # the calibration in use at the end of the run
    out_of_reach: int = 0  # control intervals with the SLO out of reach (autoscale.slo_reach)
    decisions: int = 0
    slo_problem: str | None = None  # the last out-of-reach message


class SpotragController:
    """The operator's timer, minus the API calls."""

    uses_gateway = True

    def __init__(
        self, *, name: str, policy: ScalingPolicy, spot: SpotSettings, interval: float, start: int | None = None
    ) -> None:
        self.name = name
        self.start = policy.floor if start is None else start
        self.policy = policy
        self.spot = spot
        self.interval = interval
        self.scaler_state = AutoscalerState()
        self.calibration_state = CalibrationState()
        self.placement_state = PlacementState()
        self.log = DecisionLog()

    def _split(self, desired: int, engines: list[EngineView], now: float) -> Target:
        result, self.placement_state = placement.place(
            desired=desired,
            baseline=self.policy.on_demand_baseline,
            settings=self.spot,
            engines=engines,
            state=self.placement_state,
            now=now,
        )
        self.log.placements[result.reason] += 1
        self.log.give_ups += len(result.give_up)
        return Target(desired=desired, by_capacity=result.target, give_up=result.give_up)

    def initial(self) -> Target:
        desired = self.start
        self.scaler_state = AutoscalerState(desired=desired)
        self.log.timeline.append((0.0, desired))
        return self._split(desired, [], 0.0)

    def control(self, view: ClusterView) -> Target:
        live = [e for e in view.engines if e.phase != placement.DRAINING]
        observed = Observation(
            now=view.now,
            queued_tokens=view.queued_tokens,
            ready=sum(1 for e in live if e.phase == placement.READY),
            starting=sum(1 for e in live if e.phase != placement.READY),
            draining=len(view.engines) - len(live),
            prompt_tokens=view.prompt_tokens,
            output_tokens=view.output_tokens,
            requests=view.in_flight_requests,
        )
        step, self.scaler_state, self.calibration_state = autoscale.scale(
            self.policy,
            observed,
            samples=view.engine_samples,
            ttft_buckets=view.ttft_buckets,
            autoscaler=self.scaler_state,
            calibration_state=self.calibration_state,
        )
        decision = step.decision
        self.log.reasons[decision.reason] += 1
        if step.calibration.feedback != self.log.last_feedback:
            self.log.feedback_changes += 1
            self.log.last_feedback = step.calibration.feedback
        self.log.last_calibration = step.calibration
        self.log.decisions += 1
        if step.slo_problem:
            self.log.out_of_reach += 1
            self.log.slo_problem = step.slo_problem
        if decision.changed:
            self.log.changes += 1
            self.log.timeline.append((view.now, decision.desired))
        return self._split(decision.desired, view.engines, view.now)


class FixedController:
    """On-demand provisioned for the peak: never scales."""

    uses_gateway = False
    interval = None

    def __init__(self, *, name: str, engines: int) -> None:
        self.name = name
        self.engines = engines
        self.log = DecisionLog(timeline=[(0.0, engines)])

    def initial(self) -> Target:
        return Target(desired=self.engines, by_capacity={placement.ON_DEMAND: self.engines, placement.SPOT: 0})

    def control(self, view: ClusterView) -> Target:
        return self.initial()


class KubeAIController:
    """KubeAI's request-count autoscaler."""

    uses_gateway = False

    def __init__(
        self,
        *,
        name: str,
        settings: KubeAISettings,
        spot: SpotSettings,
        min_replicas: int,
        max_replicas: int,
        start: int | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.spot = spot
        self.interval = settings.interval_seconds
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        # Like movingaverage.NewSimple(make([]float64, n)): starts from zeros.
        samples = math.ceil(settings.time_window_seconds / settings.interval_seconds)
        self.window: deque[float] = deque([0.0] * samples, maxlen=samples)
        self.required_scale_downs = math.ceil(settings.scale_down_delay_seconds / settings.interval_seconds)
        self.scale_downs = 0
        self.desired = min_replicas if start is None else start
        self.log = DecisionLog(timeline=[(0.0, self.desired)])

    def initial(self) -> Target:
        return node_pool(self.desired, self.spot)

    def control(self, view: ClusterView) -> Target:
        self.window.append(float(view.in_flight_requests))
        average = sum(self.window) / len(self.window)
        wanted = min(max(math.ceil(average / self.settings.target_requests), self.min_replicas), self.max_replicas)
        if wanted < self.desired:
            self.scale_downs += 1
            if self.scale_downs < self.required_scale_downs:
                wanted = self.desired
        else:
            self.scale_downs = 0
        if wanted != self.desired:
            self.scale_downs = 0
            self.log.changes += 1
            self.log.timeline.append((view.now, wanted))
            self.desired = wanted
        return node_pool(self.desired, self.spot)


class KedaController:
    """KEDA + HPA on vllm:num_requests_waiting (AverageValue target)."""

    uses_gateway = False
    TOLERANCE = 0.1  # the HPA's
    SCALE_UP_PODS, SCALE_UP_PERIOD = 4, 15.0  # HPA default scale-up policy: max(4 pods, 100%) per 15 s

    def __init__(
        self,
        *,
        name: str,
        settings: KedaSettings,
        spot: SpotSettings,
        min_replicas: int,
        max_replicas: int,
        start: int | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.spot = spot
        self.interval = settings.polling_interval_seconds
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.desired = min_replicas if start is None else start
        self.recommendations: deque[tuple[float, int]] = deque()
        self.log = DecisionLog(timeline=[(0.0, self.desired)])

    def initial(self) -> Target:
        return node_pool(self.desired, self.spot)

    def control(self, view: ClusterView) -> Target:
        current = self.desired
        metric = view.waiting_requests
        threshold = self.settings.waiting_threshold
        if current > 0 and abs(metric / (current * threshold) - 1) <= self.TOLERANCE:
            recommendation = current
        else:
            recommendation = math.ceil(metric / threshold)
        recommendation = min(max(recommendation, self.min_replicas), self.max_replicas)
        self.recommendations.append((view.now, recommendation))
        while (
            self.recommendations
            and self.recommendations[0][0] < view.now - self.settings.scale_down_stabilization_seconds
        ):
            self.recommendations.popleft()
        if recommendation > current:
            wanted = min(recommendation, max(current + self.SCALE_UP_PODS, 2 * current))
        else:
            wanted = min(current, max(n for _, n in self.recommendations))
        if wanted != current:
            self.log.changes += 1
            self.log.timeline.append((view.now, wanted))
            self.desired = wanted
        return node_pool(self.desired, self.spot)
