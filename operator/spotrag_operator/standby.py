"""Warm standby engines (spec.model.standby): loaded, asleep, woken instead of a cold start.

A cold vLLM start took 110-148 s on an H200 before reading any weights
(../shared/vllm/README.md), longer than AWS's 120 s notice; a slept engine
woke in 0.81 s. So with `standby.replicas: N` the operator keeps N engine
pods outside the serving set (labels spotrag.io/serving=false,
spotrag.io/standby=true), started like any engine with vLLM's
--enable-sleep-mode, and once Ready puts them to sleep (POST /sleep?level=1:
weights offloaded, KV cache freed, 2 GiB of GPU memory left).

When the engine plan asks for a new engine (a scale-up, a replacement after
an interruption notice or a rebalance recommendation), a Ready standby of
that capacity is woken instead (POST /wake_up) and joins the serving set by
its label; a new standby is started behind it. A standby that fails to wake
within wakeTimeoutSeconds is deleted and a cold engine created in its place,
never waited on again.

`plan_standbys` is pure (tables in tests/unit/test_standby.py); `is_sleeping`,
`wake` and `sleep` are the engine calls observe and execute make.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass, field

import httpx

from . import render
from .engine_load import engine_url
from .plan import parse_time, pod_facts

LABEL_STANDBY = render.LABEL_STANDBY
ANNOTATION_SLEEP_ASKED = "spotrag.io/sleep-asked"
# A sleep asked for and not done by then (the engine restarted, the call was lost) is asked again.
RESLEEP_AFTER = datetime.timedelta(seconds=120)
SLEEP_TIMEOUT_SECONDS = 120.0  # the measured sleep took 10.7 s


def is_standby(pod: dict) -> bool:
    return (pod["metadata"].get("labels") or {}).get(LABEL_STANDBY) == "true"


@dataclass(frozen=True)
class Standby:
    name: str
    capacity: str
    spec_hash: str
    ready: bool
    failed: bool
    terminating: bool
    created: datetime.datetime
    url: str | None = None
    asleep: bool | None = None  # from the engine's /is_sleeping; None: not known
    sleep_asked: datetime.datetime | None = None
    node: str | None = None

    @classmethod
    def from_pod(cls, pod: dict, asleep: bool | None = None) -> Standby:
        return cls(
            **pod_facts(pod),
            url=engine_url(pod),
            asleep=asleep,
            sleep_asked=parse_time((pod["metadata"].get("annotations") or {}).get(ANNOTATION_SLEEP_ASKED)),
        )


@dataclass(frozen=True)
class Wake:
    name: str
    url: str
    capacity: str  # of the engine it stands in for


@dataclass
class StandbyPlan:
    wake: list[Wake] = field(default_factory=list)  # instead of these cold starts
    cold: list[str] = field(default_factory=list)  # the engine creates no standby covers
    create: list[str] = field(default_factory=list)  # new standby pods (capacities)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (standby, why)
    sleep: list[tuple[str, str]] = field(default_factory=list)  # (standby, url) to put to sleep
    notes: list[str] = field(default_factory=list)


def plan_standbys(
    standbys: list[Standby],
    *,
    creates: list[str],
    want: int,
    capacity: str,
    spec_hash: str,
    now: datetime.datetime,
    leaving_nodes: frozenset[str] = frozenset(),
) -> StandbyPlan:
    """`creates`: the engine plan's new engines (capacities); `want`:
    standby.replicas; `capacity`: where new standbys go; `leaving_nodes`:
    nodes with an interruption signal (a standby there is no replacement)."""
    plan = StandbyPlan()
    usable: list[Standby] = []
    for standby in standbys:
        if standby.terminating:
            continue
        if standby.failed:
            plan.delete.append((standby.name, "failed"))
        elif standby.node in leaving_nodes:
            plan.delete.append((standby.name, f"its node {standby.node} is going"))
        elif standby.spec_hash != spec_hash:
            plan.delete.append((standby.name, "outdated: the engine spec changed"))
        else:
            usable.append(standby)
    # Any Ready standby holds the model loaded; asleep ones first, then the oldest.
    wakeable = sorted(
        (s for s in usable if s.ready and s.url), key=lambda s: (s.asleep is not True, s.created.timestamp())
    )
    for wanted in creates:
        match = next((s for s in wakeable if s.capacity == wanted), None)
        if match is None:
            plan.cold.append(wanted)
            continue
        wakeable.remove(match)
        plan.wake.append(Wake(match.name, match.url or "", wanted))
    woken = {w.name for w in plan.wake}
    kept = [s for s in usable if s.name not in woken]
    if len(kept) < want:
        plan.create += [capacity] * (want - len(kept))
    else:
        # Fewer wanted: the not-ready and youngest go first.
        extra = sorted(kept, key=lambda s: (s.ready, -s.created.timestamp()))[: len(kept) - want]
        plan.delete += [(s.name, "more standbys than standby.replicas") for s in extra]
        kept = [s for s in kept if s not in extra]
    for standby in kept:
        asked_lately = standby.sleep_asked is not None and now - standby.sleep_asked < RESLEEP_AFTER
        if standby.ready and standby.url and standby.asleep is False and not asked_lately:
            plan.sleep.append((standby.name, standby.url))
    if plan.wake:
        plan.notes.append("waking " + ", ".join(w.name for w in plan.wake) + " instead of starting cold")
    return plan


def standby_capacity(spec: dict) -> str:
    """Standbys go where spare engines go: spot when it is enabled."""
    return render.SPOT if spec["spot"]["enabled"] else render.ON_DEMAND


# The engine calls ------------------------------------------------------------


def is_sleeping(client: httpx.Client, pod: dict) -> bool | None:
    """The engine's own answer (vLLM's dev-mode GET /is_sleeping); None when it cannot be asked."""
    url = engine_url(pod)
    if url is None:
        return None
    try:
        response = client.get(f"{url}/is_sleeping", timeout=1.0)
        response.raise_for_status()
        return bool(response.json()["is_sleeping"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def wake(client: httpx.Client, url: str, *, timeout: float) -> str | None:
    """POST /wake_up and wait for it (0.81 s measured); why it failed, or None."""
    try:
        response = client.post(f"{url}/wake_up", timeout=timeout)
    except httpx.HTTPError as error:
        return f"POST {url}/wake_up: {type(error).__name__}: {error}"
    if response.status_code != 200:
        return f"POST {url}/wake_up answered {response.status_code}: {response.text[:200]}"
    return None


def sleep_in_background(url: str) -> threading.Thread:
    """POST /sleep?level=1, which takes seconds (10.7 s measured), without holding
    the reconcile: the next reconcile reads /is_sleeping, and asks again after
    RESLEEP_AFTER if the engine still is not asleep."""

    def ask() -> None:
        try:
            httpx.post(f"{url}/sleep", params={"level": 1}, timeout=SLEEP_TIMEOUT_SECONDS)
        except httpx.HTTPError:
            pass  # seen as still awake next time

    thread = threading.Thread(target=ask, name=f"sleep {url}", daemon=True)
    thread.start()
    return thread
