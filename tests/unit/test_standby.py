"""Warm standby engines: the pure plan as tables, then the real operator
(kopf against the Kubernetes API stand-in over HTTP) putting an engine
emulator to sleep and waking it over HTTP instead of starting cold, and
replacing a standby that does not wake."""

from __future__ import annotations

import dataclasses
import datetime
import random
from collections.abc import Iterator

import httpx
import pytest

from spotrag_operator import render
from spotrag_operator.crd import API_VERSION, KIND, defaulted_spec
from spotrag_operator.reconcile import plan_reconcile
from spotrag_operator.standby import LABEL_STANDBY, Standby, Wake, plan_standbys
from spotrag_runtime.engine_emulator import EmulatorProcess, start_engine_emulator

from .test_operator import (  # noqa: F401  the fixtures too
    api,
    diagnose,
    engines,
    events_of,
    kube,
    kubeconfig,
    new_ragd,
    operator,
    wait_for,
)
from .test_reconcile import NOW as PLAN_NOW
from .test_reconcile import engine, observed

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
HASH = "h1"


def standby(name: str, *, ready=True, asleep=True, capacity=render.SPOT, age=60, **facts) -> Standby:
    values = dict(
        name=name,
        capacity=capacity,
        spec_hash=HASH,
        ready=ready,
        failed=False,
        terminating=False,
        created=NOW - datetime.timedelta(seconds=age),
        url=f"http://{name}:8000",
        asleep=asleep,
    )
    return Standby(**(values | facts))


def planned(standbys, creates=(), want=1, capacity=render.SPOT, leaving=frozenset()):
    return plan_standbys(
        list(standbys),
        creates=list(creates),
        want=want,
        capacity=capacity,
        spec_hash=HASH,
        now=NOW,
        leaving_nodes=leaving,
    )


@pytest.mark.parametrize(
    ("standbys", "creates", "want", "wake", "cold", "create", "delete", "sleep"),
    [
        # Nothing needed, one asleep: nothing to do.
        ([standby("s1")], [], 1, [], [], [], [], []),
        # A replacement (notice or scale-up) wakes the standby; a new one starts behind it.
        ([standby("s1")], ["spot"], 1, ["s1"], [], ["spot"], [], []),
        # More needed than standbys: the rest start cold.
        ([standby("s1")], ["spot", "spot"], 1, ["s1"], ["spot"], ["spot"], [], []),
        # An on-demand engine is not stood in for by a spot standby.
        ([standby("s1")], ["on-demand"], 1, [], ["on-demand"], [], [], []),
        # Still loading: cannot stand in yet.
        ([standby("s1", ready=False, asleep=None)], ["spot"], 1, [], ["spot"], [], [], []),
        # Asleep ones are woken before awake ones, then the oldest.
        (
            [standby("young", age=10), standby("awake", asleep=False, age=99), standby("old", age=90)],
            ["spot"],
            3,
            ["old"],
            [],
            ["spot"],
            [],
            [("awake", "http://awake:8000")],
        ),
        # Ready and awake, never asked to sleep: asked now.
        ([standby("s1", asleep=False)], [], 1, [], [], [], [], [("s1", "http://s1:8000")]),
        # Asked a moment ago: not asked again yet.
        ([standby("s1", asleep=False, sleep_asked=NOW - datetime.timedelta(seconds=5))], [], 1, [], [], [], [], []),
        # Failed or outdated standbys go (and are made up for).
        ([standby("bad", failed=True), standby("old", spec_hash="h0")], [], 1, [], [], ["spot"], ["bad", "old"], []),
        # Fewer wanted: the youngest goes.
        ([standby("a", age=99), standby("b", age=10)], [], 1, [], [], [], ["b"], []),
        # Standby off: none kept, every new engine cold.
        ([], ["spot"], 0, [], ["spot"], [], [], []),
    ],
    ids=["idle", "wake", "wake-and-cold", "capacity", "loading", "order", "sleep", "asked", "replace", "fewer", "off"],
)
def test_plan_standbys(standbys, creates, want, wake, cold, create, delete, sleep):
    plan = planned(standbys, creates, want)
    assert [w.name for w in plan.wake] == wake
    assert plan.cold == cold and plan.create == create
    assert [name for name, _ in plan.delete] == delete
    assert plan.sleep == sleep


def test_a_standby_on_a_node_that_is_going_is_replaced_not_woken():
    plan = planned(
        [standby("doomed", node="gpu-1"), standby("safe", node="gpu-2", age=10)],
        ["spot"],
        want=2,
        leaving=frozenset({"gpu-1"}),
    )
    assert [w.name for w in plan.wake] == ["safe"]
    assert plan.delete == [("doomed", "its node gpu-1 is going")] and plan.create == ["spot", "spot"]


def test_a_woken_standby_stands_in_for_the_capacity_asked():
    plan = planned([standby("s1")], ["spot"])
    assert plan.wake == [Wake("s1", "http://s1:8000", "spot")] and plan.notes


# The real operator -------------------------------------------------------------


def loopback_ip() -> str:
    """A loopback address of its own, so an emulator can listen on vLLM's port 8000."""
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


def sleepy_engine(ip: str, **options) -> EmulatorProcess:
    engine = start_engine_emulator(
        port=render.ENGINE_PORT,
        host=ip,
        served_model_name="qwen2.5-7b",
        enable_sleep_mode=True,
        sleep_seconds=0.2,
        wake_seconds=0.2,
        **options,
    )
    engine.wait_ready()
    return engine


@pytest.fixture
def standby_engines() -> Iterator[list[EmulatorProcess]]:
    started: list[EmulatorProcess] = []
    yield started
    for process in started:
        process.kill()
        process.stop()


def play_kubelet(client, pod: dict, ip: str | None = None) -> None:
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    if ip:
        status["podIP"] = ip
    client.patch("v1", "Pod", pod["metadata"]["name"], {"status": status}, "default", subresource="status")


def standbys_of(client, body) -> list[dict]:
    return [p for p in engines(client, body) if p["metadata"]["labels"].get(LABEL_STANDBY) == "true"]


def events(client, body, reason: str) -> list:
    return [e for e in events_of(client, body) if e.reason == reason]


def sleeping(engine: EmulatorProcess) -> bool:
    return httpx.get(f"{engine.url}/is_sleeping", timeout=2).json()["is_sleeping"]


def test_the_operator_sleeps_a_standby_wakes_it_for_a_scale_up_and_replaces_one_that_cannot_wake(
    operator,  # noqa: F811
    kube,  # noqa: F811
    standby_engines,
):
    body = new_ragd(
        kube,
        {
            "model": {"standby": {"replicas": 1, "wakeTimeoutSeconds": 5}},
            "scaling": {"minReplicas": 1, "onDemandBaseline": 1},
            "spot": {"enabled": False},
        },
    )
    name = body["metadata"]["name"]
    describe = diagnose(kube, body)
    [first] = wait_for(lambda: standbys_of(kube, body), what="a standby pod", diagnose=describe)
    assert first["metadata"]["labels"][render.LABEL_SERVING] == "false"  # never in the Service
    assert "--enable-sleep-mode" in first["spec"]["containers"][0]["args"]
    for pod in engines(kube, body):
        if pod["metadata"]["name"] != first["metadata"]["name"]:
            play_kubelet(kube, pod)

    # Loaded (Ready): the operator puts it to sleep, over vLLM's HTTP API.
    ip = loopback_ip()
    good = sleepy_engine(ip)
    standby_engines.append(good)
    play_kubelet(kube, first, ip)
    wait_for(lambda: sleeping(good), what="the standby to be put to sleep", diagnose=describe)
    wait_for(lambda: kube.get(API_VERSION, KIND, name, "default")["status"].get("standbyReplicas") == 1, what="status")

    # A scale-up wakes it instead of starting cold; a new standby starts behind it.
    kube.patch(API_VERSION, KIND, name, {"spec": {"scaling": {"minReplicas": 2}}}, "default")
    woken = wait_for(
        lambda: next(
            (
                p
                for p in engines(kube, body)
                if p["metadata"]["name"] == first["metadata"]["name"]
                and p["metadata"]["labels"].get(render.LABEL_SERVING) == "true"
            ),
            None,
        ),
        what="the standby woken into the serving set",
        diagnose=describe,
    )
    assert LABEL_STANDBY not in woken["metadata"]["labels"] and not sleeping(good)
    wait_for(lambda: events(kube, body, "StandbyWoken"), what="a StandbyWoken Event")
    [second] = wait_for(
        lambda: [p for p in standbys_of(kube, body) if p["metadata"]["name"] != first["metadata"]["name"]],
        what="a new standby behind the woken one",
        diagnose=describe,
    )
    live = [p for p in engines(kube, body) if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 3  # the baseline, the woken standby, the new standby: nothing started cold

    # A standby that cannot wake is deleted and replaced by a cold engine, not waited on.
    ip = loopback_ip()
    broken = sleepy_engine(ip, wake_fails=True)
    standby_engines.append(broken)
    play_kubelet(kube, second, ip)
    wait_for(lambda: sleeping(broken), what="the second standby asleep", diagnose=describe)
    kube.patch(API_VERSION, KIND, name, {"spec": {"scaling": {"minReplicas": 3}}}, "default")
    [failed] = wait_for(lambda: events(kube, body, "StandbyWakeFailed"), what="a StandbyWakeFailed Event")
    assert "answered 500" in failed.message
    wait_for(
        lambda: all(
            p["metadata"]["name"] != second["metadata"]["name"] or p["metadata"].get("deletionTimestamp")
            for p in engines(kube, body)
        ),
        what="the standby that did not wake deleted",
        diagnose=describe,
    )
    serving_now = [
        p
        for p in engines(kube, body)
        if p["metadata"]["labels"].get(render.LABEL_SERVING) == "true" and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(serving_now) == 3


# The reconcile plan: which signals wake a standby -----------------------------------

NODE_SIGNALS = {
    "notice": "karpenter.sh/disrupted",  # the engine leaves serving; its replacement is the standby
    "rebalance": "aws-node-termination-handler/rebalance-recommendation",  # started before any notice
}


@pytest.mark.parametrize("signal", list(NODE_SIGNALS), ids=list(NODE_SIGNALS))
def test_a_notice_or_a_rebalance_recommendation_wakes_the_standby_instead_of_a_cold_start(signal):
    overrides = {"model": {"standby": {"replicas": 1}}, "scaling": {"minReplicas": 2}}
    base = observed(overrides)
    spec_hash = render.engine_spec_hash(defaulted_spec(base.body))
    engines = [
        dataclasses.replace(engine("od", render.ON_DEMAND, node="gpu-0"), spec_hash=spec_hash),
        dataclasses.replace(engine("sp", render.SPOT, node="gpu-1"), spec_hash=spec_hash),
    ]
    taint = {"key": NODE_SIGNALS[signal], "effect": "NoSchedule", "timeAdded": "2026-11-21T11:59:50Z"}
    nodes = {
        "gpu-1": {"metadata": {"name": "gpu-1", "labels": {}}, "spec": {"taints": [taint]}},
        "gpu-2": {"metadata": {"name": "gpu-2", "labels": {}}, "spec": {}},
    }
    asleep = Standby(
        name="warm",
        capacity=render.SPOT,
        spec_hash=spec_hash,
        ready=True,
        failed=False,
        terminating=False,
        created=PLAN_NOW - datetime.timedelta(minutes=5),
        url="http://10.0.0.9:8000",
        asleep=True,
        node="gpu-2",
    )
    plan = plan_reconcile(
        dataclasses.replace(observed(overrides, engines=engines, nodes=nodes), standbys=[asleep]), None
    )
    assert [w.name for w in plan.wakes] == ["warm"]
    assert plan.wakes[0].patch["metadata"]["labels"] == {render.LABEL_SERVING: "true", render.LABEL_STANDBY: None}
    # No cold engine; only a new standby behind the woken one.
    assert [capacity for capacity, _ in plan.creates] == ["spot standby"]
    [(_, new_standby)] = plan.creates
    assert new_standby["metadata"]["labels"][render.LABEL_STANDBY] == "true"
    assert new_standby["metadata"]["labels"][render.LABEL_SERVING] == "false"
    assert plan.status["standbyReplicas"] == 0  # the one there is being woken
    drained = [d.name for d in plan.engines.drain]
    assert drained == (["sp"] if signal == "notice" else [])  # a rebalance keeps the engine serving meanwhile
