"""The discrete-event simulation of one RAGDeployment under one policy.

The world: requests arrive from the trace; engines are created Pending, get a
node `node_start_seconds` later when the capacity type can be had (spot can
not during an outage), load the model for `model_load_seconds`, then serve.
Spot nodes are taken back at `interruptions_per_hour` with a notice of
`notice_seconds`. Each engine bills from the moment its node is asked for to
the moment it is gone.

Requests, with spotrag's gateway (the spotrag policies): they wait in the
gateway, which sends each to the serving engine holding the fewest tokens as
long as that engine holds less than `maxInflightTokensPerEngine`; a request
still waiting after `queueTimeoutSeconds` gets a 503 (lost). An engine on an
interrupted node leaves the serving set at the notice; what it has not
started goes back to the gateway at once, what it is generating may finish
until the deadline, and whatever is left then is resumed on another engine
with the answer so far as part of the prompt.

Without a gateway (the baselines): a request goes at arrival to the serving
engine with the fewest requests (KubeAI's least-load) and waits in that
vLLM's queue; at an interruption the pod is deleted and whatever it has not
finished when its termination grace ends is lost.

Scale-in is graceful for every policy: the engine leaves the serving set and
is deleted once it has finished its requests.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from spotrag_operator import calibration, placement
from spotrag_operator.calibration import EngineSample
from spotrag_operator.placement import EngineView

from .engine_model import DRAINING, GONE, PENDING, READY, STARTING, Engine, Request
from .policies import ClusterView, Target
from .presets import Profile
from .trace import TraceRequest

ON_DEMAND, SPOT = placement.ON_DEMAND, placement.SPOT
SAMPLE_SECONDS = 60.0
# Work left at the end of the trace is given this long to finish.
DRAIN_AFTER_TRACE_SECONDS = 3600.0

# The gateway's TTFT histogram buckets (runtime/spotrag_runtime/gateway/metrics.py).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)

# Event kinds, in the order they run at equal times.
_ENGINE, _NODE_UP, _LOADED, _NOTICE, _DEADLINE, _OUTAGE_END, _CONTROL, _SAMPLE = range(8)


@dataclass
class EngineRecord:
    capacity: str
    launched: float | None
    gone: float | None
    interrupted: bool


@dataclass
class RunResult:
    name: str
    horizon: float
    requests: list[Request]
    engines: list[EngineRecord]
    samples: dict[str, list[float]]
    interruptions: int = 0
    resumed: int = 0
    retried: int = 0
    log: object = None
    outages: list[tuple[float, float]] = field(default_factory=list)


class Simulation:
    def __init__(
        self,
        profile: Profile,
        trace: list[TraceRequest],
        controller,
        *,
        seed: int,
        horizon: float,
        outages: list[tuple[float, float]],
        notices: list[tuple[float, int]] = (),
    ) -> None:
        """`notices`: scripted interruptions, (time, engine number), on top of the random ones."""
        self.profile = profile
        self.spec = profile.engine
        self.controller = controller
        self.gateway = controller.uses_gateway
        self.trace = trace
        self.horizon = horizon
        self.outages = sorted(outages)
        self.rng = np.random.default_rng([seed, 7])
        gateway_spec = profile.spec["gateway"]
        self.queue_timeout = float(gateway_spec["queueTimeoutSeconds"])
        self.max_inflight_tokens = int(gateway_spec["maxInflightTokensPerEngine"])
        self.interrupt_rate = profile.interruptions_per_hour / 3600.0
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.engines: list[Engine] = []
        self.serving: list[Engine] = []
        self.queue: deque[Request] = deque()  # the gateway's, or requests with no engine to go to
        self.queue_tokens = 0
        self.queue_prompt = 0  # the prompt part of queue_tokens
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.requests: list[Request] = []
        self.target: Target | None = None
        self.interruptions = 0
        self.resumed = 0
        self.retried = 0
        self.samples: dict[str, list[float]] = {
            k: []
            for k in ("time", "queued_tokens", "ready_spot", "ready_on_demand", "ready", "engines", "arrived_tokens")
        }
        self.arrived_tokens = 0
        self.scripted_notices = list(notices)

    # -- the event queue ----------------------------------------------------------

    def _at(self, time: float, kind: int, subject=None, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, kind, self.seq, subject, version))

    def _reschedule(self, engine: Engine) -> None:
        engine.version += 1
        when = engine.next_event()
        if when is not None:
            self._at(when, _ENGINE, engine, engine.version)

    def spot_available(self, now: float) -> bool:
        return not any(start <= now < end for start, end in self.outages)

    # -- engines' lives -------------------------------------------------------------

    def _create(self, capacity: str, *, ready: bool = False) -> Engine:
        engine = Engine(len(self.engines), capacity, self.now, self.spec)
        self.engines.append(engine)
        if ready:  # warm at the start of the run
            engine.launched = self.now
            engine.phase, engine.since = READY, self.now
            self._serve(engine)
            self._arm_interruption(engine)
        elif capacity == ON_DEMAND or self.spot_available(self.now):
            self._launch(engine)
        return engine

    def _launch(self, engine: Engine) -> None:
        engine.launched = self.now
        self._at(self.now + self.profile.node_start_seconds, _NODE_UP, engine)
        self._arm_interruption(engine)

    def _arm_interruption(self, engine: Engine) -> None:
        if engine.capacity == SPOT and self.interrupt_rate > 0:
            self._at(self.now + self.rng.exponential(1.0 / self.interrupt_rate), _NOTICE, engine)

    def _serve(self, engine: Engine) -> None:
        self.serving.append(engine)
        if self.gateway:
            self._dispatch()
        else:
            while self.queue:
                request = self.queue.popleft()
                self.queue_tokens -= request.need
                self.queue_prompt -= request.prompt
                self._route(request)

    def _remove(self, engine: Engine) -> None:
        """The engine and its node are gone (billing stops)."""
        if engine.phase == GONE:
            return
        if engine in self.serving:
            self.serving.remove(engine)
        engine.phase, engine.gone_at = GONE, self.now
        engine.version += 1

    def _drain(self, engine: Engine) -> None:
        """Out of the serving set; deleted once it has finished its work."""
        if engine in self.serving:
            self.serving.remove(engine)
        engine.phase, engine.since = DRAINING, self.now
        if self.gateway:
            engine.advance(self.now)
            self._requeue(engine.take_waiting(), front=True)
            self._reschedule(engine)
        if engine.empty:
            self._remove(engine)

    # -- requests -------------------------------------------------------------------

    def _arrive(self, item: TraceRequest) -> None:
        request = Request(len(self.requests), item.arrival, item.prompt_tokens, item.output_tokens)
        self.requests.append(request)
        self.arrived_tokens += request.need
        if self.gateway:
            self.queue.append(request)
            self.queue_tokens += request.need
            self.queue_prompt += request.prompt
            self._dispatch()
        else:
            self._route(request)

    def _requeue(self, requests: list[Request], *, front: bool) -> None:
        for request in reversed(requests) if front else requests:
            request.queued_at = self.now
            if front:
                self.queue.appendleft(request)
            else:
                self.queue.append(request)
            self.queue_tokens += request.need
            self.queue_prompt += request.prompt

    def _dispatch(self) -> None:
        """The gateway: least queued tokens first, never more than maxInflightTokensPerEngine on one engine."""
        while self.queue and self.serving:
            engine = min(self.serving, key=Engine.assigned_tokens)
            request = self.queue[0]
            if engine.assigned_tokens() + request.need > self.max_inflight_tokens and engine.requests:
                return
            self.queue.popleft()
            self.queue_tokens -= request.need
            self.queue_prompt -= request.prompt
            engine.accept(request, self.now)
            self._reschedule(engine)

    def _route(self, request: Request) -> None:
        """No gateway: the least-loaded serving engine takes it into its own queue."""
        if not self.serving:
            self.queue.append(request)  # held until an engine is ready (KubeAI's proxy does this)
            self.queue_tokens += request.need
            self.queue_prompt += request.prompt
            return
        engine = min(self.serving, key=lambda e: e.requests)
        engine.accept(request, self.now)
        self._reschedule(engine)

    def _expire_queue(self) -> None:
        if not self.gateway or not self.queue:
            return
        kept = deque()
        for request in self.queue:
            if self.now - request.queued_at > self.queue_timeout:
                request.lost = "queue timeout"
                self.queue_tokens -= request.need
                self.queue_prompt -= request.prompt
            else:
                kept.append(request)
        self.queue = kept

    # -- the controller ---------------------------------------------------------------

    def _view(self) -> ClusterView:
        views, waiting, in_flight = [], 0, len(self.queue)
        samples = []
        prompt = float(self.queue_prompt)
        for engine in self.engines:
            if engine.phase == GONE:
                continue
            phase = {
                PENDING: placement.PENDING,
                STARTING: placement.STARTING,
                READY: placement.READY,
                DRAINING: placement.DRAINING,
            }[engine.phase]
            views.append(EngineView(name=engine.name, capacity=engine.capacity, phase=phase, since=engine.since))
            waiting += len(engine.waiting)
            in_flight += engine.requests
            if engine.phase in (READY, DRAINING):
                engine.advance(self.now)
                prompt += engine.queued_prompt_tokens()
                # What the operator would scrape from this engine's vLLM /metrics.
                samples.append(
                    EngineSample(
                        name=engine.name,
                        time=self.now,
                        prompt_tokens=engine.prompt_counter,
                        generation_tokens=engine.generation_counter,
                        running=len(engine.running) + len(engine.prefill),
                        waiting=len(engine.waiting),
                        state=calibration.SERVING if engine.phase == READY else calibration.DRAINING,
                        finished_prompt_tokens=engine.finished_prompt_counter,
                        finished_requests=engine.finished_counter,
                        prompt_buckets=engine.prompt_buckets(),
                    )
                )
        queued = self.queued_tokens()
        prompt = min(max(0.0, prompt), queued)
        cumulative, total = {}, 0
        for bound, count in zip((*TTFT_BUCKETS, "+Inf"), self.ttft_counts, strict=True):
            total += count
            cumulative[str(float(bound)) if bound != "+Inf" else bound] = float(total)
        return ClusterView(
            now=self.now,
            engines=views,
            queued_tokens=queued,
            in_flight_requests=in_flight,
            waiting_requests=waiting,
            prompt_tokens=prompt,
            output_tokens=queued - prompt,
            engine_samples=samples,
            ttft_buckets=cumulative,
        )

    def queued_tokens(self) -> float:
        total = float(self.queue_tokens)
        for engine in self.engines:
            if engine.phase != GONE and not engine.empty:
                engine.advance(self.now)
                total += engine.queued_tokens()
        return max(0.0, total)

    def _apply(self, target: Target) -> None:
        """Create and remove engines to match the target (the engine plan's rules)."""
        self.target = target
        live = [e for e in self.engines if e.phase in (PENDING, STARTING, READY)]
        by_name = {e.name: e for e in live}
        for name in target.give_up:
            engine = by_name.get(name)
            if engine is not None and engine.phase == PENDING:
                self._remove(engine)
        live = [e for e in live if e.phase != GONE]
        excess: list[Engine] = []
        if target.by_capacity is not None:
            for capacity, want in target.by_capacity.items():
                have = [e for e in live if e.capacity == capacity]
                for _ in range(want - len(have)):
                    self._create(capacity)
                excess += sorted(have, key=self._victim_order)[: max(0, len(have) - want)]
        else:
            for _ in range(target.desired - len(live)):
                on_demand = sum(
                    1 for e in self.engines if e.phase in (PENDING, STARTING, READY) and e.capacity == ON_DEMAND
                )
                baseline = self.profile.spec["scaling"]["onDemandBaseline"]
                # The node pool: the baseline on on-demand; then spot when there is any, else on-demand.
                self._create(ON_DEMAND if on_demand < baseline or not self.spot_available(self.now) else SPOT)
            excess = sorted(live, key=self._victim_order)[: max(0, len(live) - target.desired)]
        # A ready engine leaves only while enough others stay ready: capacity moves without a gap.
        ready_left = sum(1 for e in live if e.phase == READY)
        for engine in sorted(excess, key=self._victim_order):
            if engine.phase != READY:
                self._remove(engine)
            elif ready_left - 1 >= target.desired:
                ready_left -= 1
                self._drain(engine)

    @staticmethod
    def _victim_order(engine: Engine) -> tuple:
        # Not placed first, then not ready, then the ready engine with the least work (issue 5 §3).
        rank = {PENDING: 0, STARTING: 1, READY: 2}[engine.phase]
        return (rank, engine.requests, -engine.created)

    def _control(self) -> None:
        self._expire_queue()
        self._apply(self.controller.control(self._view()))

    # -- interruptions ----------------------------------------------------------------

    def _notice(self, engine: Engine) -> None:
        if engine.phase == GONE or engine.interrupted:
            return
        self.interruptions += 1
        engine.interrupted = True
        if engine.phase in (PENDING, STARTING):
            self._remove(engine)
        else:
            if engine in self.serving:
                self.serving.remove(engine)
            engine.phase, engine.since = DRAINING, self.now
            engine.advance(self.now)
            if self.gateway:
                not_started = engine.take_waiting()
                self.retried += len(not_started)
                self._requeue(not_started, front=True)
                self._at(self.now + self.profile.notice_seconds, _DEADLINE, engine)
                self._reschedule(engine)
                self._dispatch()
            else:
                # The pod is deleted now; vLLM has its termination grace, at most the notice.
                self._at(
                    self.now + min(self.profile.termination_grace_seconds, self.profile.notice_seconds),
                    _DEADLINE,
                    engine,
                )
        # The replacement is asked for at once (a ReplicaSet, or the operator's node watch).
        if self.target is not None:
            self._apply(self.target)

    def _deadline(self, engine: Engine) -> None:
        if engine.phase == GONE:
            return
        engine.advance(self.now)
        not_started, started = engine.take_all()
        if self.gateway:
            for request in started:
                request.resumes += 1
            self.resumed += len(started)
            self.retried += len(not_started)
            self._requeue(started + not_started, front=True)
        else:
            for request in not_started + started:
                request.lost = "interrupted"
        self._remove(engine)
        if self.gateway:
            self._dispatch()

    # -- the loop -----------------------------------------------------------------------

    def _engine_event(self, engine: Engine) -> None:
        first, finished = engine.progress(self.now)
        for request in first:  # the gateway's TTFT histogram
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, self.now - request.arrival)] += 1
        for request in finished:
            request.done = self.now
        if engine.phase == DRAINING and engine.empty:
            self._remove(engine)
            return
        self._reschedule(engine)
        if finished and self.gateway:
            self._dispatch()

    def _sample(self) -> None:
        s = self.samples
        s["time"].append(self.now)
        s["queued_tokens"].append(self.queued_tokens())
        s["ready_spot"].append(sum(1 for e in self.serving if e.capacity == SPOT))
        s["ready_on_demand"].append(sum(1 for e in self.serving if e.capacity == ON_DEMAND))
        s["ready"].append(len(self.serving))
        s["engines"].append(sum(1 for e in self.engines if e.phase in (PENDING, STARTING, READY)))
        s["arrived_tokens"].append(self.arrived_tokens)
        self.arrived_tokens = 0

    def run(self) -> RunResult:
        initial = self.controller.initial()
        self.target = initial
        if initial.by_capacity is not None:
            for capacity, count in initial.by_capacity.items():
                for _ in range(count):
                    self._create(capacity, ready=True)
        else:
            baseline = self.profile.spec["scaling"]["onDemandBaseline"]
            for index in range(initial.desired):
                self._create(ON_DEMAND if index < baseline else SPOT, ready=True)
        if self.controller.interval:
            self._at(self.controller.interval, _CONTROL)
        self._at(SAMPLE_SECONDS, _SAMPLE)
        for _, end in self.outages:
            self._at(end, _OUTAGE_END)
        for time, number in self.scripted_notices:
            self._at(time, _NOTICE, number)

        trace, next_arrival = self.trace, 0
        end = self.horizon + DRAIN_AFTER_TRACE_SECONDS
        while True:
            arrival = trace[next_arrival].arrival if next_arrival < len(trace) else math.inf
            event_time = self.events[0][0] if self.events else math.inf
            if arrival <= event_time:
                if arrival == math.inf:
                    break
                self.now = arrival
                self._arrive(trace[next_arrival])
                next_arrival += 1
                continue
            if event_time > end or (next_arrival >= len(trace) and self.now >= self.horizon and self._all_done()):
                break
            time, kind, _, subject, version = heapq.heappop(self.events)
            self.now = time
            if kind == _ENGINE:
                if version == subject.version and subject.phase != GONE:
                    self._engine_event(subject)
            elif kind == _NODE_UP:
                if subject.phase == PENDING:
                    subject.phase, subject.since = STARTING, time
                    self._at(time + self.profile.model_load_seconds, _LOADED, subject)
            elif kind == _LOADED:
                if subject.phase == STARTING:
                    subject.phase, subject.since = READY, time
                    self._serve(subject)
            elif kind == _NOTICE:
                if isinstance(subject, int):  # scripted: the engine is known by its number
                    if subject >= len(self.engines):
                        continue
                    subject = self.engines[subject]
                self._notice(subject)
            elif kind == _DEADLINE:
                self._deadline(subject)
            elif kind == _OUTAGE_END:
                for engine in self.engines:
                    if engine.capacity == SPOT and engine.phase == PENDING and engine.launched is None:
                        self._launch(engine)
            elif kind == _CONTROL:
                self._control()
                self._at(time + self.controller.interval, _CONTROL)
            elif kind == _SAMPLE:
                if time <= self.horizon:
                    self._sample()
                    self._at(time + SAMPLE_SECONDS, _SAMPLE)

        for request in self.requests:
            if request.done is None and request.lost is None:
                request.lost = "unfinished"
        records = [EngineRecord(e.capacity, e.launched, e.gone_at, e.interrupted) for e in self.engines]
        return RunResult(
            name=self.controller.name,
            horizon=self.horizon,
            requests=self.requests,
            engines=records,
            samples=self.samples,
            interruptions=self.interruptions,
            resumed=self.resumed,
            retried=self.retried,
            log=getattr(self.controller, "log", None),
            outages=list(self.outages),
        )

    def _all_done(self) -> bool:
        return not self.queue and all(e.empty for e in self.engines if e.phase != GONE)
