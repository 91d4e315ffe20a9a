"""The operator's own Prometheus metrics (served by `spotrag operator
--metrics-port`, 9090 by default), one series per RAGDeployment."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from . import render
from .plan import Engine

LABELS = ("namespace", "ragdeployment")

ENGINES = Gauge("spotrag_operator_engines", "Engine pods by capacity type and state.", LABELS + ("capacity", "state"))
DESIRED = Gauge("spotrag_operator_desired_engines", "Engines the autoscaler wants.", LABELS)
QUEUED_TOKENS = Gauge(
    "spotrag_operator_queued_tokens", "Queued tokens summed over the gateways, as last read (-1: unavailable).", LABELS
)
COST_PER_HOUR = Gauge(
    "spotrag_operator_cost_per_hour", "Estimated cost per hour of engines on nodes, from spec.pricing.", LABELS
)
DRAINS = Counter("spotrag_operator_drains_total", "Engines taken out of serving, by why.", LABELS + ("cause",))
INTERRUPTIONS = Counter(
    "spotrag_operator_interruptions_total",
    "Engines drained because their node announced it was going, by signal source.",
    LABELS + ("source",),
)
SCALE_EVENTS = Counter(
    "spotrag_operator_scale_events_total", "Changes of the desired engine count.", LABELS + ("direction",)
)

STATES = ("ready", "starting", "pending", "draining")
COUNTERS = {"drains": DRAINS, "interruptions": INTERRUPTIONS, "scale_events": SCALE_EVENTS}


@dataclass(frozen=True)
class Count:
    """One increment of a counter, as a reconcile plans it."""

    counter: str  # a key of COUNTERS
    labels: tuple[str, ...]


@dataclass(frozen=True)
class EngineGauges:
    """The gauges of one RAGDeployment after a reconcile."""

    engines: tuple[Engine, ...]
    desired: int
    queued: float | None
    cost: float | None


def count(sample: Count) -> None:
    COUNTERS[sample.counter].labels(*sample.labels).inc()


def engine_state(engine: Engine) -> str:
    if engine.draining:
        return "draining"
    if engine.ready:
        return "ready"
    return "starting" if engine.node else "pending"


def record(namespace: str, name: str, gauges: EngineGauges) -> None:
    counts = {(c, s): 0 for c in render.CAPACITY_TYPES for s in STATES}
    for engine in gauges.engines:
        if not engine.terminating and not engine.failed:
            counts[(engine.capacity, engine_state(engine))] += 1
    for (capacity, state), count in counts.items():
        ENGINES.labels(namespace, name, capacity, state).set(count)
    DESIRED.labels(namespace, name).set(gauges.desired)
    QUEUED_TOKENS.labels(namespace, name).set(-1 if gauges.queued is None else gauges.queued)
    if gauges.cost is not None:
        COST_PER_HOUR.labels(namespace, name).set(gauges.cost)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted RAGDeployment's series."""
    for metric in (ENGINES, DESIRED, QUEUED_TOKENS, COST_PER_HOUR, DRAINS, INTERRUPTIONS, SCALE_EVENTS):
        for labels in list(metric._metrics):  # prometheus-client keeps children by label tuple
            if labels[:2] == (namespace, name):
                metric.remove(*labels)
