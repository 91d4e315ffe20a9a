"""The node agent: each cloud's answers as tables, then the agent against real HTTP stand-ins.

The metadata service is ``spotrag_box.metadata_server`` (each cloud's paths,
headers and answers on 127.0.0.1); the Kubernetes API is the box's API server,
reached through the real ``kubernetes`` client and a kubeconfig. Waits poll
for an outcome and time out only as a safety net; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import jsonpatch
import kubernetes
import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.metadata_server import MetadataServer
from spotrag_box.testing import eventually_async
from spotrag_operator.signals import Action, node_signal
from spotrag_runtime.node_agent import (
    ANNOTATION,
    TAINT_KEY,
    InvalidNodeMark,
    Notice,
    UnrecognisedResponse,
    parse_aws_instance_action,
    parse_aws_rebalance,
    parse_azure_scheduled_events,
    parse_gce_maintenance_event,
    parse_gce_preempted,
    parse_node_mark,
)
from spotrag_runtime.node_agent.agent import Agent, AgentConfig, AgentConfigError
from spotrag_runtime.node_agent.node import NodeMarker, NodeMarkError, mark_patch, plan_mark

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# --- each cloud's answers → Notice -------------------------------------------------------------


def azure(*events: dict) -> str:
    return json.dumps({"DocumentIncarnation": 7, "Events": list(events)})


def event(
    event_type: str,
    not_before: str = "Sat, 21 Nov 2026 12:00:30 GMT",
    resources=("spot-vm-0",),
    status: str = "Scheduled",
    event_id: str = "E1",
) -> dict:
    return {
        "EventId": event_id,
        "EventStatus": status,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": list(resources),
        "NotBefore": not_before,
    }


# (what, parser, body, expected) where expected is None, an exception type, or
# (kind, cloud, deadline, warns).
PARSE_TABLE = [
    ("aws no notice (404)", parse_aws_instance_action, None, None),
    (
        "aws terminate",
        parse_aws_instance_action,
        '{"action": "terminate", "time": "2026-11-21T12:02:00Z"}',
        ("interruption", "aws", at(120), False),
    ),
    (
        "aws stop",
        parse_aws_instance_action,
        '{"action": "stop", "time": "2026-11-21T12:01:55Z"}',
        ("interruption", "aws", at(115), False),
    ),
    (
        "aws hibernate",
        parse_aws_instance_action,
        '{"action": "hibernate", "time": "2026-11-21T12:02:00+00:00"}',
        ("interruption", "aws", at(120), False),
    ),
    (
        "aws no time: 2 minutes",
        parse_aws_instance_action,
        '{"action": "terminate"}',
        ("interruption", "aws", at(120), False),
    ),
    (
        "aws malformed time: now",
        parse_aws_instance_action,
        '{"action": "terminate", "time": "in two minutes"}',
        ("interruption", "aws", NOW, True),
    ),
    (
        "aws time without zone: now",
        parse_aws_instance_action,
        '{"action": "terminate", "time": "2026-11-21T12:02:00"}',
        ("interruption", "aws", NOW, True),
    ),
    ("aws body not JSON: now", parse_aws_instance_action, "<html>terminate</html>", ("interruption", "aws", NOW, True)),
    ("aws no rebalance (404)", parse_aws_rebalance, None, None),
    (
        "aws rebalance: a hint, 2 minutes at the soonest",
        parse_aws_rebalance,
        '{"noticeTime": "2026-11-21T11:50:00Z"}',
        ("rebalance", "aws", at(120), False),
    ),
    ("aws rebalance without noticeTime", parse_aws_rebalance, "{}", ("rebalance", "aws", at(120), True)),
    ("gce not preempted", parse_gce_preempted, "FALSE", None),
    ("gce preempted: 30 s", parse_gce_preempted, "TRUE\n", ("interruption", "gcp", at(30), False)),
    ("gce preempted garbage", parse_gce_preempted, "MAYBE", UnrecognisedResponse),
    ("gce no maintenance", parse_gce_maintenance_event, "NONE", None),
    ("gce live migration is no drain", parse_gce_maintenance_event, "MIGRATE_ON_HOST_MAINTENANCE", None),
    (
        "gce terminate on maintenance: 60 s",
        parse_gce_maintenance_event,
        "TERMINATE_ON_HOST_MAINTENANCE",
        ("maintenance", "gcp", at(60), False),
    ),
    ("gce maintenance garbage", parse_gce_maintenance_event, "<html>", UnrecognisedResponse),
    ("azure no events", parse_azure_scheduled_events, azure(), None),
    (
        "azure preempt, RFC 1123 NotBefore",
        parse_azure_scheduled_events,
        azure(event("Preempt")),
        ("interruption", "azure", at(30), False),
    ),
    (
        "azure preempt, RFC 3339 NotBefore",
        parse_azure_scheduled_events,
        azure(event("Preempt", "2026-11-21T12:00:25Z")),
        ("interruption", "azure", at(25), False),
    ),
    (
        "azure preempt of another VM",
        parse_azure_scheduled_events,
        azure(event("Preempt", resources=["spot-vm-9"])),
        None,
    ),
    (
        "azure scale-set name with underscore",
        parse_azure_scheduled_events,
        azure(event("Preempt", resources=["_spot-vm-0"])),
        ("interruption", "azure", at(30), False),
    ),
    (
        "azure event naming no VM is ours",
        parse_azure_scheduled_events,
        azure(event("Preempt", resources=[])),
        ("interruption", "azure", at(30), False),
    ),
    (
        "azure terminate notification",
        parse_azure_scheduled_events,
        azure(event("Terminate")),
        ("interruption", "azure", at(30), False),
    ),
    ("azure freeze is no drain", parse_azure_scheduled_events, azure(event("Freeze")), None),
    (
        "azure redeploy is maintenance",
        parse_azure_scheduled_events,
        azure(event("Redeploy", "Sat, 21 Nov 2026 12:10:00 GMT")),
        ("maintenance", "azure", at(600), False),
    ),
    (
        "azure preempt wins over a reboot",
        parse_azure_scheduled_events,
        azure(event("Reboot", "Sat, 21 Nov 2026 12:00:10 GMT", event_id="R"), event("Preempt", event_id="P")),
        ("interruption", "azure", at(30), False),
    ),
    (
        "azure malformed NotBefore: now",
        parse_azure_scheduled_events,
        azure(event("Preempt", "soon")),
        ("interruption", "azure", NOW, True),
    ),
    (
        "azure started, no NotBefore: now",
        parse_azure_scheduled_events,
        azure(event("Preempt", "", status="Started")),
        ("interruption", "azure", NOW, False),
    ),
    (
        "azure scheduled, no NotBefore: 30 s",
        parse_azure_scheduled_events,
        azure(event("Preempt", "")),
        ("interruption", "azure", at(30), False),
    ),
    ("azure not JSON", parse_azure_scheduled_events, "<html>", UnrecognisedResponse),
    ("azure without Events", parse_azure_scheduled_events, '{"DocumentIncarnation": 1}', UnrecognisedResponse),
]


@pytest.mark.parametrize("what, parse, body, expected", PARSE_TABLE, ids=[row[0] for row in PARSE_TABLE])
def test_parse_table(what: str, parse: Callable, body: str | None, expected) -> None:
    kwargs = {"vm_name": "spot-vm-0"} if parse is parse_azure_scheduled_events else {}
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse(body, detected=NOW, **kwargs)
        return
    notice = parse(body, detected=NOW, **kwargs)
    if expected is None:
        assert notice is None
        return
    assert (notice.kind, notice.cloud, notice.deadline, notice.warning is not None) == expected
    assert notice.detected == NOW and notice.source == "node-agent"


def test_the_same_notice_polled_again_is_the_same_notice() -> None:
    body = '{"action": "terminate", "time": "2026-11-21T12:02:00Z"}'
    first = parse_aws_instance_action(body, detected=NOW)
    again = parse_aws_instance_action(body, detected=at(2))
    later = parse_aws_instance_action('{"action": "terminate", "time": "2026-11-21T12:03:00Z"}', detected=at(2))
    assert first.same_notice(again) and not first.same_notice(later)
    # Without a stated time the deadline is derived, yet the notice is still the same one.
    assert parse_gce_preempted("TRUE", detected=NOW).same_notice(parse_gce_preempted("TRUE", detected=at(5)))


# --- the mark on the Node: the operator's side of the contract --------------------------------

INTERRUPTION = Notice(
    kind="interruption",
    cloud="aws",
    deadline=at(120),
    detected=NOW,
    ref="instance-action terminate 2026-11-21T12:02:00Z",
)
REBALANCE = Notice(kind="rebalance", cloud="aws", deadline=at(120), detected=NOW, ref="rebalance 2026-11-21T11:50:00Z")
MAINTENANCE = Notice(
    kind="maintenance",
    cloud="gcp",
    deadline=at(60),
    detected=NOW,
    ref="maintenance-event TERMINATE_ON_HOST_MAINTENANCE",
)


@pytest.mark.parametrize("notice", [INTERRUPTION, REBALANCE, MAINTENANCE], ids=lambda n: n.kind)
def test_mark_round_trips(notice: Notice) -> None:
    assert parse_node_mark({ANNOTATION: notice.to_annotation(), "other": "x"}) == notice


def test_parse_node_mark_without_mark_is_none() -> None:
    assert parse_node_mark(None) is None
    assert parse_node_mark({"other": "x"}) is None


def test_parse_node_mark_unreadable_deadline_is_now_with_warning() -> None:
    mark = json.dumps(
        {
            "kind": "interruption",
            "cloud": "gcp",
            "deadline": "soon",
            "detected": "2026-11-21T11:59:00Z",
            "source": "node-agent",
            "ref": "preempted",
        }
    )
    notice = parse_node_mark({ANNOTATION: mark}, now=NOW)
    assert notice.deadline == NOW and notice.detected == at(-60)
    assert "soon" in notice.warning


@pytest.mark.parametrize(
    "raw, message",
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"kind": "explosion", "cloud": "aws"}', "kind 'explosion'"),
        ('{"kind": "interruption", "cloud": "ibm"}', "cloud 'ibm'"),
    ],
)
def test_parse_node_mark_rejects_what_is_not_a_mark(raw: str, message: str) -> None:
    with pytest.raises(InvalidNodeMark, match=message):
        parse_node_mark({ANNOTATION: raw})


@pytest.mark.parametrize(
    "notice, action",
    [(INTERRUPTION, Action.DRAIN), (MAINTENANCE, Action.DRAIN), (REBALANCE, Action.PREWARM)],
    ids=lambda v: getattr(v, "kind", ""),
)
def test_the_operator_reads_what_the_agent_writes(notice: Notice, action: Action) -> None:
    node = jsonpatch.apply_patch(node_body(), mark_patch(node_body(), notice))
    signal = node_signal(node, NOW)
    assert (signal.kind, signal.action, signal.warning) == (notice.kind, action, None)
    if action is Action.DRAIN:
        assert signal.deadline == notice.deadline


def node_body(*, annotations: dict | None = None, taints: list | None = None, spec: bool = True) -> dict:
    metadata = {"name": "spot-node-1", "resourceVersion": "41"}
    if annotations is not None:
        metadata["annotations"] = annotations
    body = {"apiVersion": "v1", "kind": "Node", "metadata": metadata}
    if spec:
        body["spec"] = {"taints": taints} if taints is not None else {}
    return body


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def ours(kind: str) -> dict:
    return {"key": TAINT_KEY, "value": kind, "effect": "NoSchedule"}


# (what, node, notice to write, expected annotation, expected taints)
PATCH_TABLE = [
    ("bare node", node_body(), INTERRUPTION, INTERRUPTION.to_annotation(), [ours("interruption")]),
    ("node without spec", node_body(spec=False), INTERRUPTION, INTERRUPTION.to_annotation(), [ours("interruption")]),
    (
        "others' taints and annotations kept",
        node_body(annotations={"a": "b"}, taints=[GPU_TAINT]),
        INTERRUPTION,
        INTERRUPTION.to_annotation(),
        [GPU_TAINT, ours("interruption")],
    ),
    (
        "rebalance: annotation, no taint",
        node_body(taints=[GPU_TAINT]),
        REBALANCE,
        REBALANCE.to_annotation(),
        [GPU_TAINT],
    ),
    (
        "rebalance then interruption",
        node_body(annotations={ANNOTATION: REBALANCE.to_annotation()}, taints=[GPU_TAINT]),
        INTERRUPTION,
        INTERRUPTION.to_annotation(),
        [GPU_TAINT, ours("interruption")],
    ),
    (
        "clear: our taint goes, others stay",
        node_body(
            annotations={ANNOTATION: MAINTENANCE.to_annotation(), "a": "b"}, taints=[ours("maintenance"), GPU_TAINT]
        ),
        None,
        None,
        [GPU_TAINT],
    ),
]


@pytest.mark.parametrize("what, node, notice, annotation, taints", PATCH_TABLE, ids=[row[0] for row in PATCH_TABLE])
def test_mark_patch_table(what: str, node: dict, notice: Notice | None, annotation: str | None, taints: list) -> None:
    ops = mark_patch(node, notice)
    # Guarded: applied to a node someone else changed since, it fails instead of dropping their write.
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "41"}
    patched = jsonpatch.apply_patch(node, ops)
    assert patched["metadata"].get("annotations", {}).get(ANNOTATION) == annotation
    assert patched["spec"]["taints"] == taints
    assert {k: v for k, v in patched["metadata"].get("annotations", {}).items() if k != ANNOTATION} == {
        k: v for k, v in node["metadata"].get("annotations", {}).items() if k != ANNOTATION
    }
    assert mark_patch(patched, notice) == []  # marked once: nothing left to write


STALE = Notice(kind="interruption", cloud="aws", deadline=at(-3600), detected=at(-3720), ref="instance-action old")

# (what, mark on the node, active notices, every endpoint answered, expected (action, notice))
PLAN_TABLE = [
    ("nothing anywhere", None, [], True, ("keep", None)),
    ("a notice on a clean node", None, [INTERRUPTION], True, ("write", INTERRUPTION)),
    ("the same notice again", INTERRUPTION, [INTERRUPTION], True, ("keep", None)),
    (
        "the same notice, later detection",
        INTERRUPTION,
        [dataclasses.replace(INTERRUPTION, detected=at(9))],
        True,
        ("keep", None),
    ),
    ("a rebalance never hides an interruption", INTERRUPTION, [REBALANCE], True, ("keep", None)),
    ("an interruption after a rebalance", REBALANCE, [REBALANCE, INTERRUPTION], True, ("write", INTERRUPTION)),
    (
        "an earlier deadline of the same kind",
        INTERRUPTION,
        [dataclasses.replace(INTERRUPTION, ref="b", deadline=at(60))],
        True,
        ("write", dataclasses.replace(INTERRUPTION, ref="b", deadline=at(60))),
    ),
    ("survived its deadline, cloud shows nothing: clear", STALE, [], True, ("clear", None)),
    ("survived, but not every endpoint answered yet", STALE, [], False, ("keep", None)),
    ("survived, a rebalance remains: downgrade", STALE, [REBALANCE], True, ("write", REBALANCE)),
    (
        "past its deadline, the cloud still shows it",
        STALE,
        [dataclasses.replace(STALE, detected=NOW)],
        True,
        ("keep", None),
    ),
]


@pytest.mark.parametrize("what, current, active, observed, expected", PLAN_TABLE, ids=[row[0] for row in PLAN_TABLE])
def test_plan_mark_table(what: str, current: Notice | None, active: list, observed: bool, expected: tuple) -> None:
    plan = plan_mark(current, active, NOW, all_observed=observed)
    assert (plan.action, plan.notice) == expected


def test_config_errors_are_clear() -> None:
    with pytest.raises(AgentConfigError, match="--node-name or set NODE_NAME"):
        AgentConfig(node_name="")
    with pytest.raises(AgentConfigError, match="cloud 'ibm'"):
        AgentConfig(node_name="n", cloud="ibm")
    with pytest.raises(AgentConfigError, match="poll_interval must be positive"):
        AgentConfig(node_name="n", poll_interval=0)


# --- the agent against the stand-ins -----------------------------------------------------------

NODE = "spot-node-1"


@pytest.fixture
def kube_api():
    with KubeAPIServer() as api:
        api.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": NODE,
                    "labels": {"karpenter.sh/capacity-type": "spot"},
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {"taints": [GPU_TAINT]},
            }
        )
        yield api


@pytest.fixture
def kubeconfig(kube_api, tmp_path) -> str:
    return str(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
def core(kubeconfig):
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    yield kubernetes.client.CoreV1Api(client)
    client.close()


async def read_node(core) -> dict:
    response = await asyncio.to_thread(core.read_node, NODE, _preload_content=False)
    return json.loads(response.data)


def fast_config(kubeconfig: str, metadata_url: str, **overrides) -> AgentConfig:
    settings = {
        "node_name": NODE,
        "metadata_url": metadata_url,
        "kubeconfig": kubeconfig,
        "poll_interval": 0.05,
        "request_timeout": 0.5,
        "detect_timeout": 0.5,
        "max_backoff": 0.2,
        "long_poll_s": 5,
    }
    return AgentConfig(**{**settings, **overrides})


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        exit_code = await asyncio.wait_for(task, 15)
    assert exit_code == 0


def answered(server: MetadataServer, path_end: str, status: int | None = 200) -> int:
    return sum(1 for r in server.requests() if r.path.endswith(path_end) and r.status == status)


def node_patches(api: KubeAPIServer) -> list:
    return [r for r in api.requests() if r.method == "PATCH" and r.path == f"/api/v1/nodes/{NODE}"]


def our_mark(node: dict) -> Notice | None:
    return parse_node_mark(node["metadata"].get("annotations"))


def our_taints(node: dict) -> list:
    return [t for t in node["spec"].get("taints") or [] if t["key"] == TAINT_KEY]


# (cloud, how the cloud announces it, endpoint the agent reads, kind, taint value)
NOTICES = [
    ("aws", lambda s: s.interrupt(at=datetime(2031, 1, 1, 12, 2, tzinfo=UTC)), "spot/instance-action", "interruption"),
    ("aws", lambda s: s.rebalance(), "rebalance", "rebalance"),
    ("gcp", lambda s: s.interrupt(), "instance/preempted", "interruption"),
    ("gcp", lambda s: s.maintenance(), "instance/maintenance-event", "maintenance"),
    ("azure", lambda s: s.interrupt(at=datetime(2031, 1, 1, 12, 0, 30, tzinfo=UTC)), "scheduledevents", "interruption"),
    ("azure", lambda s: s.maintenance(azure_event_type="Redeploy"), "scheduledevents", "maintenance"),
]


@pytest.mark.parametrize("cloud, announce, endpoint, kind", NOTICES, ids=[f"{row[0]}-{row[3]}" for row in NOTICES])
async def test_agent_marks_its_node_when_the_cloud_gives_notice(
    cloud, announce, endpoint, kind, kube_api, core, kubeconfig
) -> None:
    with MetadataServer(cloud) as metadata:
        async with running(Agent(fast_config(kubeconfig, metadata.url))) as agent:
            # No notice yet: the agent reads the endpoint and leaves the node alone.
            # (GCE: the first read answers at once; the long-polls after it answer only on a change.)
            reads = 1 if cloud == "gcp" else 3
            await eventually_async(
                lambda: answered(metadata, endpoint, 404 if cloud == "aws" else 200) >= reads,
                what=f"the agent to read {endpoint}",
            )
            assert agent.cloud == cloud  # found by --cloud auto
            assert our_mark(await read_node(core)) is None and node_patches(kube_api) == []

            before = datetime.now(UTC).replace(microsecond=0)
            announce(metadata)
            node = await eventually_async(lambda: _marked(core), what=f"the node to be marked for {kind}")

    mark = our_mark(node)
    assert (mark.kind, mark.cloud, mark.source, mark.warning) == (kind, cloud, "node-agent", None)
    assert mark.detected >= before
    if cloud == "aws" and kind == "interruption":
        assert mark.deadline == datetime(2031, 1, 1, 12, 2, tzinfo=UTC)  # the notice's own time
    elif cloud == "azure" and kind == "interruption":
        assert mark.deadline == datetime(2031, 1, 1, 12, 0, 30, tzinfo=UTC)  # NotBefore
    elif cloud == "gcp":
        assert mark.deadline - mark.detected == timedelta(seconds=30 if kind == "interruption" else 60)
    # The taint for what takes the node away, none for a rebalance; others' taints untouched.
    assert our_taints(node) == ([ours(kind)] if kind != "rebalance" else [])
    assert GPU_TAINT in node["spec"]["taints"]
    assert node["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] == "0"
    assert [r.content_type for r in node_patches(kube_api)] == ["application/json-patch+json"]


async def _marked(core) -> dict | None:
    node = await read_node(core)
    return node if our_mark(node) else None


async def test_a_notice_seen_many_times_and_after_a_restart_marks_once(kube_api, core, kubeconfig) -> None:
    with MetadataServer("aws") as metadata:
        metadata.interrupt()
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="aws"))):
            await eventually_async(lambda: _marked(core), what="the node to be marked")
            seen = answered(metadata, "spot/instance-action")
            await eventually_async(
                lambda: answered(metadata, "spot/instance-action") >= seen + 5,
                what="the agent to read the notice again",
            )
        marked = await read_node(core)
        # A restarted agent finds its own mark and the same notice: nothing to write.
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="aws"))):
            seen = answered(metadata, "spot/instance-action")
            await eventually_async(
                lambda: answered(metadata, "spot/instance-action") >= seen + 5,
                what="the restarted agent to read the notice",
            )
    assert len(node_patches(kube_api)) == 1
    assert (await read_node(core))["metadata"]["resourceVersion"] == marked["metadata"]["resourceVersion"]


async def test_slow_metadata_times_out_quietly_and_recovers(kube_api, core, kubeconfig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spotrag.node_agent")
    with MetadataServer("aws") as metadata:
        metadata.delay = 1.0  # longer than the agent's 0.5 s request timeout
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="aws"))):
            # The token PUT is the first request of each try; several tries mean it backs off and goes on.
            await eventually_async(
                lambda: len([r for r in metadata.requests() if r.method == "PUT"]) >= 3,
                what="the agent to retry the slow endpoint",
            )
            metadata.delay = 0
            metadata.interrupt()
            node = await eventually_async(
                lambda: _marked(core), what="the node to be marked once metadata is fast again"
            )
    assert our_mark(node).kind == "interruption"
    slow = [r.getMessage() for r in caplog.records if " is slow" in r.getMessage()]
    # Logged once per endpoint when it turned slow, not once per timeout.
    assert sorted(m.split(" is slow")[0] for m in slow) == ["metadata rebalance", "metadata spot/instance-action"]
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_detection_waits_for_a_slow_metadata_service(kube_api, core, kubeconfig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spotrag.node_agent")
    with MetadataServer("azure") as metadata:
        metadata.delay = 1.0  # connects, then answers later than the 0.5 s probe timeout: a cloud, slow
        async with running(Agent(fast_config(kubeconfig, metadata.url))) as agent:
            await eventually_async(lambda: len(metadata.requests()) >= 6, what="the agent to probe twice")
            assert agent.cloud is None  # still detecting, not given up
            metadata.delay = 0
            metadata.interrupt()
            node = await eventually_async(lambda: _marked(core), what="the node to be marked once detection succeeds")
    assert (agent.cloud, our_mark(node).cloud) == ("azure", "azure")
    retrying = [r for r in caplog.records if "accepts connections but does not answer" in r.getMessage()]
    assert len(retrying) == 1


async def test_no_cloud_wait_keeps_running_until_stopped(caplog) -> None:
    caplog.set_level(logging.INFO, logger="spotrag.node_agent")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        config = AgentConfig(
            node_name=NODE,
            metadata_url=f"http://127.0.0.1:{closed.getsockname()[1]}",
            detect_timeout=0.5,
            no_cloud="wait",
        )
        async with running(Agent(config)) as agent:
            await eventually_async(
                lambda: any("not a cloud instance" in r.getMessage() for r in caplog.records),
                what="the agent to find no cloud",
            )
            assert agent.cloud is None and agent.marker is None  # waiting, touching nothing


async def test_metadata_down_backs_off_without_crashing_and_recovers(kube_api, core, kubeconfig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spotrag.node_agent")
    with MetadataServer("gcp") as metadata:
        metadata.down = True
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="gcp"))) as agent:
            await eventually_async(
                lambda: answered(metadata, "instance/preempted", None) >= 4,
                what="the agent to retry the dropped endpoint",
            )
            metadata.down = False
            await eventually_async(
                lambda: answered(metadata, "instance/preempted") >= 1, what="the agent to read again"
            )
            metadata.interrupt()
            node = await eventually_async(lambda: _marked(core), what="the node to be marked after the outage")
            assert agent.active["preempted"].kind == "interruption"
    assert our_mark(node).kind == "interruption"
    down = [r.getMessage() for r in caplog.records if " is down" in r.getMessage()]
    assert sorted(m.split(" is down")[0] for m in down) == ["metadata maintenance-event", "metadata preempted"]


async def test_a_failing_api_server_is_retried(kube_api, core, kubeconfig) -> None:
    kube_api.inject_faults(method="PATCH", path_regex=f"/api/v1/nodes/{NODE}$", status=500, times=2)
    with MetadataServer("azure") as metadata:
        metadata.interrupt()
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="azure"))):
            await eventually_async(lambda: _marked(core), what="the node to be marked despite API errors")
    assert [r.status for r in node_patches(kube_api)] == [500, 500, 200]


async def test_a_stale_mark_is_cleared_when_the_instance_survived(kube_api, core, kubeconfig) -> None:
    # Marked before a stop/start (or a finished maintenance); the cloud shows nothing now.
    stale = Notice(
        kind="maintenance",
        cloud="gcp",
        deadline=datetime.now(UTC) - timedelta(hours=1),
        detected=datetime.now(UTC) - timedelta(hours=1, minutes=1),
        ref="maintenance-event old",
    )
    node = await read_node(core)
    await asyncio.to_thread(core.patch_node, NODE, mark_patch(node, stale), _content_type="application/json-patch+json")
    with MetadataServer("gcp") as metadata:
        async with running(Agent(fast_config(kubeconfig, metadata.url, cloud="gcp"))):
            node = await eventually_async(lambda: _cleared(core), what="the stale mark to be removed")
    assert node["spec"]["taints"] == [GPU_TAINT]


async def _cleared(core) -> dict | None:
    node = await read_node(core)
    return node if ANNOTATION not in node["metadata"].get("annotations", {}) else None


def test_a_concurrent_writer_keeps_its_taint(kube_api, core, kubeconfig) -> None:
    api_client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    try:
        marker = NodeMarker(api_client, NODE)
        seen = marker.read()
        # Someone (a person cordoning, NTH) writes the node between our read and our patch.
        cordon = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
        core.patch_node(NODE, {"spec": {"taints": [GPU_TAINT, cordon]}})
        with pytest.raises(kubernetes.client.ApiException) as stale_write:
            core.patch_node(NODE, mark_patch(seen, INTERRUPTION), _content_type="application/json-patch+json")
        assert stale_write.value.status == 422  # the resourceVersion test failed: nothing was lost
        assert marker.write(INTERRUPTION) is True  # read again, patched again
        assert marker.write(INTERRUPTION) is False  # already there
    finally:
        api_client.close()
    node = json.loads(core.read_node(NODE, _preload_content=False).data)
    assert node["spec"]["taints"] == [GPU_TAINT, cordon, ours("interruption")]


def test_a_wrong_node_name_says_so(kube_api, kubeconfig) -> None:
    api_client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    try:
        with pytest.raises(NodeMarkError, match="does not exist: is --node-name") as error:
            NodeMarker(api_client, "no-such-node").write(INTERRUPTION)
        assert error.value.status == 404
    finally:
        api_client.close()


# --- the command ---------------------------------------------------------------------------------


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "spotrag_runtime.node_agent", *args]


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NODE_NAME"}


def test_on_a_non_cloud_node_it_says_so_and_exits_0() -> None:
    # A bound port that does not listen refuses connections, as 169.254.169.254 does off-cloud.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        done = subprocess.run(
            agent_command("--node-name", NODE, "--metadata-url", url),
            env=agent_env(),
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert "not a cloud instance, nothing to watch" in done.stderr


def test_without_a_node_name_it_says_how_to_give_one() -> None:
    done = subprocess.run(
        agent_command("--cloud", "aws"), env=agent_env(), check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert "pass --node-name or set NODE_NAME" in done.stderr


async def test_sigterm_stops_it_during_a_long_poll(kube_api, kubeconfig) -> None:
    with MetadataServer("gcp") as metadata:
        process = await asyncio.create_subprocess_exec(
            *agent_command("--metadata-url", metadata.url, "--kubeconfig", kubeconfig, "--long-poll", "300"),
            env={**agent_env(), "NODE_NAME": NODE},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # The first reads answer at once; after them the agent holds 300 s long-polls.
            await eventually_async(
                lambda: (
                    answered(metadata, "instance/preempted") >= 1
                    and answered(metadata, "instance/maintenance-event") >= 1
                ),
                what="the agent to start watching",
            )
            await eventually_async(lambda: _read_its_node(kube_api), what="the agent to read its node")
            process.send_signal(signal.SIGTERM)
            # Far sooner than the long-poll would end on its own.
            _, stderr = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert "watching gcp interruption notices" in stderr.decode() and "stopping" in stderr.decode()


def _read_its_node(api: KubeAPIServer) -> bool:
    return any(r.method == "GET" and r.path == f"/api/v1/nodes/{NODE}" for r in api.requests())
