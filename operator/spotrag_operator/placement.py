"""Placement: how many of the desired engines run on on-demand and on spot (pure).

Rules:
- The on-demand baseline (`scaling.onDemandBaseline`) is always on-demand;
  everything above it goes on spot while spot is to be had.
- A spot engine still Pending (no node) after `spot.fallbackAfterSeconds` is
  given up: it is drained and replaced by an on-demand engine, and spot is
  marked short for `spot.retryAfterSeconds`, for its zone / instance type
  when the pod says which (else for every pool).
- While spot is short, spot engines that already have a node keep running;
  no new ones are asked for; on-demand fills the gap.
- When the mark expires, the count goes back to baseline + spot: new spot
  engines are created first and the on-demand engines above the baseline are
  drained only once the spot ones are Ready (the engine plan never lets the
  ready count drop below desired). If spot is still short, the new ones stay
  Pending, are given up again and the mark is renewed.

The output is a count per capacity type, the input of `plan.plan_engines`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPOT = "spot"
ON_DEMAND = "on-demand"
ANY = "*"

# Engine phases as placement sees them.
PENDING = "Pending"  # no node yet: unschedulable, or its node is still booting
STARTING = "Starting"  # on a node, pulling the image or loading the model
READY = "Ready"  # serving
DRAINING = "Draining"  # leaving the serving set; not counted
PHASES = (PENDING, STARTING, READY, DRAINING)

# Placement reasons.
SPOT_DISABLED = "SpotDisabled"
SPOT_AVAILABLE = "SpotAvailable"
SPOT_SHORT = "SpotShort"
SPOT_RETRY = "SpotRetry"


@dataclass(frozen=True, kw_only=True)
class EngineView:
    """The facts about one engine that placement needs."""

    name: str
    capacity: str  # SPOT or ON_DEMAND
    phase: str  # one of PHASES
    since: float  # seconds: when it entered its phase (for PENDING: when it was created)
    zone: str | None = None  # where the pod is pinned or landed, when known
    instance_type: str | None = None

    def __post_init__(self) -> None:
        if self.capacity not in (SPOT, ON_DEMAND):
            raise ValueError(f"engine {self.name}: capacity must be {SPOT!r} or {ON_DEMAND!r}, not {self.capacity!r}")
        if self.phase not in PHASES:
            raise ValueError(f"engine {self.name}: phase must be one of {PHASES}, not {self.phase!r}")

    @property
    def pool(self) -> str:
        return pool_key(self.zone, self.instance_type)


def pool_key(zone: str | None, instance_type: str | None) -> str:
    """`zone/instance-type`, with `*` for what is not known."""
    return f"{zone or ANY}/{instance_type or ANY}"


@dataclass(frozen=True, kw_only=True)
class SpotSettings:
    enabled: bool = True
    fallback_after_seconds: float = 180.0
    retry_after_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.fallback_after_seconds <= 0 or self.retry_after_seconds <= 0:
            raise ValueError("spot fallbackAfterSeconds and retryAfterSeconds must be positive")

    @classmethod
    def from_spec(cls, spec: dict) -> SpotSettings:
        """From a RAGDeployment spec whose CRD defaults are filled in."""
        spot = spec["spot"]
        return cls(
            enabled=spot["enabled"],
            fallback_after_seconds=spot["fallbackAfterSeconds"],
            retry_after_seconds=spot["retryAfterSeconds"],
        )


@dataclass
class PlacementState:
    """Spot pools found short, each with the time until which it counts as short."""

    short_until: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"shortUntil": dict(sorted(self.short_until.items()))}

    @classmethod
    def from_dict(cls, data: dict | None) -> PlacementState:
        if not data:
            return cls()
        raw = data.get("shortUntil") if isinstance(data, dict) else None
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"placement state 'shortUntil' must map pools to times, got {raw!r}")
        try:
            return cls(short_until={str(pool): float(until) for pool, until in raw.items()})
        except (TypeError, ValueError):
            raise ValueError(f"placement state 'shortUntil' must map pools to times, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class Placement:
    on_demand: int
    spot: int
    reason: str
    message: str
    give_up: tuple[str, ...] = ()  # Pending spot engines to drain now, replaced by on-demand
    short_pools: tuple[str, ...] = ()  # spot pools new spot engines should avoid

    @property
    def target(self) -> dict[str, int]:
        """Engines wanted per capacity type, as plan.plan_engines takes them."""
        return {ON_DEMAND: self.on_demand, SPOT: self.spot}


def place(
    *,
    desired: int,
    baseline: int,
    settings: SpotSettings,
    engines: list[EngineView],
    state: PlacementState | None = None,
    now: float,
) -> tuple[Placement, PlacementState]:
    """Split `desired` engines between on-demand and spot."""
    if desired < 0 or baseline < 0:
        raise ValueError("desired and baseline must not be negative")
    state = state or PlacementState()
    on_demand_base = min(baseline, desired)
    if not settings.enabled:
        return Placement(
            on_demand=desired, spot=0, reason=SPOT_DISABLED, message=f"spot is off: all {desired} engines on on-demand"
        ), PlacementState()

    expired = sorted(pool for pool, until in state.short_until.items() if until <= now)
    short = {pool: until for pool, until in state.short_until.items() if until > now}
    give_up = []
    for engine in engines:
        if (
            engine.capacity == SPOT
            and engine.phase == PENDING
            and now - engine.since >= settings.fallback_after_seconds
        ):
            give_up.append(engine.name)
            # An engine still waiting in a pool already marked does not extend the mark.
            short.setdefault(engine.pool, now + settings.retry_after_seconds)
    new_state = PlacementState(short_until=short)
    spot_wanted = desired - on_demand_base

    if short:
        # Keep the spot engines that got a node; ask for no more until the back-off ends.
        placed = sum(1 for e in engines if e.capacity == SPOT and e.phase in (STARTING, READY))
        spot = min(spot_wanted, placed)
        pools = tuple(sorted(short))
        until = min(short.values())
        why = (
            f"spot pending over {settings.fallback_after_seconds:g}s: gave up {', '.join(sorted(give_up))}; "
            if give_up
            else ""
        )
        message = (
            f"{why}spot short in {', '.join(pools)} (retry in {until - now:.0f}s): "
            f"{desired - spot} on-demand ({on_demand_base} baseline), {spot} spot already placed"
        )
        return Placement(
            on_demand=desired - spot,
            spot=spot,
            reason=SPOT_SHORT,
            message=message,
            give_up=tuple(sorted(give_up)),
            short_pools=pools,
        ), new_state

    if expired:
        above = sum(1 for e in engines if e.capacity == ON_DEMAND and e.phase != DRAINING) - on_demand_base
        message = (
            f"spot back-off over for {', '.join(expired)}: asking for {spot_wanted} spot engines again; "
            f"{max(0, above)} on-demand above the baseline leave once they are ready"
        )
        return Placement(on_demand=on_demand_base, spot=spot_wanted, reason=SPOT_RETRY, message=message), new_state
    message = f"{on_demand_base} on-demand (baseline), {spot_wanted} spot"
    return Placement(on_demand=on_demand_base, spot=spot_wanted, reason=SPOT_AVAILABLE, message=message), new_state
