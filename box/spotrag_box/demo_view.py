"""What the demo shows while it runs: engines by capacity type and state,
nodes and their interruption notices, queued tokens, requests served and
failed, and a log of what changed. Everything is read from the Kubernetes
API and the gateway's /metrics, as a dashboard on a real cluster would."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

import httpx
import kubernetes
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .demo_traffic import Counts
from .testing import scrape

DEPLOYMENT_LABEL = "spotrag.io/deployment"
NOTICE_TAINTS = {
    "aws-node-termination-handler/spot-itn": "AWS spot notice",
    "karpenter.sh/disrupted": "Karpenter: disrupted",
    "cloud.google.com/impending-node-termination": "GKE: terminating",
    "spotrag.io/interruption": "node agent notice",
}
CAPACITY_LABELS = ("karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType", "spotrag.io/capacity")
STATE_STYLES = {
    "Ready": "green",
    "Starting": "yellow",
    "Pending": "red",
    "Draining": "magenta",
    "Stopping": "bright_black",
}


@dataclasses.dataclass(frozen=True)
class EngineRow:
    name: str
    capacity: str
    node: str
    state: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class NodeRow:
    name: str
    capacity: str
    zone: str
    instance: str
    engines: int
    notice: str = ""


@dataclasses.dataclass
class Snapshot:
    engines: list[EngineRow]
    nodes: list[NodeRow]
    gateways_ready: int
    gateways: int
    index: str
    desired: int
    queued_tokens: int | None
    counts: Counts
    elapsed: float


def engine_state(pod: kubernetes.client.V1Pod) -> tuple[str, str]:
    labels = pod.metadata.labels or {}
    conditions = {c.type: c for c in pod.status.conditions or []}
    if pod.metadata.deletion_timestamp:
        return "Stopping", "deleted: preStop, then SIGTERM"
    if labels.get("spotrag.io/serving") == "false":
        return "Draining", (pod.metadata.annotations or {}).get("spotrag.io/drain-reason", "")
    scheduled = conditions.get("PodScheduled")
    if not pod.spec.node_name:
        return "Pending", (
            scheduled.message if scheduled is not None and scheduled.status == "False" else "waiting for the scheduler"
        ) or ""
    ready = conditions.get("Ready")
    if ready is not None and ready.status == "True":
        return "Ready", ""
    waiting = next((c.state.waiting for c in pod.status.container_statuses or [] if c.state and c.state.waiting), None)
    return "Starting", (waiting.reason if waiting else "loading the model")


def node_capacity(labels: dict[str, str]) -> str:
    for key in CAPACITY_LABELS:
        if key in labels:
            return labels[key].lower().replace("_", "-")
    return "?"


def node_notice(node: kubernetes.client.V1Node) -> str:
    for taint in node.spec.taints or []:
        if taint.key in NOTICE_TAINTS:
            return NOTICE_TAINTS[taint.key]
    return "cordoned" if node.spec.unschedulable else ""


def queued_tokens(gateway_url: str | None) -> int | None:
    """spotrag_queued_tokens summed over the gateway's label sets."""
    if gateway_url is None:
        return None
    try:
        samples = scrape(f"{gateway_url}/metrics", timeout=2).find("spotrag_queued_tokens")
    except httpx.HTTPError:
        return None
    return int(sum(sample.value for sample in samples)) if samples else None


class Observer:
    """Reads the cluster and turns changes into log lines."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        deployment: str,
        *,
        started: float,
        deadlines: Callable[[], dict[str, datetime.datetime]] = dict,
    ):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.deployment = deployment
        self.deadlines = deadlines  # node → when it goes, where the cloud says (the box)
        self.started = started  # the demo's clock (time.monotonic() at its start)
        self._last_states: dict[str, str] = {}
        self._last_notices: dict[str, str] = {}
        self._known_nodes: set[str] | None = None

    def snapshot(self, counts: Counts, gateway_url: str | None, log: Callable[[str], None]) -> Snapshot:
        selector = f"{DEPLOYMENT_LABEL}={self.deployment}"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        nodes = self.core.list_node().items
        engine_pods = [p for p in pods if (p.metadata.labels or {}).get("spotrag.io/component") == "engine"]
        engines = []
        for pod in sorted(engine_pods, key=lambda p: p.metadata.creation_timestamp or datetime.datetime.min):
            state, detail = engine_state(pod)
            capacity = (pod.metadata.labels or {}).get("spotrag.io/capacity", "?")
            engines.append(EngineRow(pod.metadata.name, capacity, pod.spec.node_name or "-", state, detail))
            key = pod.metadata.name
            if self._last_states.get(key) != state:
                where = f" on {pod.spec.node_name}" if pod.spec.node_name else ""
                log(f"engine {key} ({capacity}){where}: {state}{' - ' + detail if detail else ''}")
                self._last_states[key] = state
        for gone in set(self._last_states) - {p.metadata.name for p in engine_pods}:
            log(f"engine {gone}: removed")
            del self._last_states[gone]

        deadlines = self.deadlines()
        now = datetime.datetime.now(datetime.UTC)
        per_node: dict[str, int] = {}
        for row in engines:
            per_node[row.node] = per_node.get(row.node, 0) + 1
        node_rows = []
        for node in sorted(nodes, key=lambda n: n.metadata.name):
            labels = node.metadata.labels or {}
            if "nvidia.com/gpu" not in (node.status.allocatable or {}):
                continue
            notice = node_notice(node)
            if notice and self._last_notices.get(node.metadata.name) != notice:
                log(f"node {node.metadata.name}: {notice}")
            self._last_notices[node.metadata.name] = notice
            if notice and node.metadata.name in deadlines:
                notice += f", gone in {max(0, (deadlines[node.metadata.name] - now).total_seconds()):.0f}s"
            node_rows.append(
                NodeRow(
                    node.metadata.name,
                    node_capacity(labels),
                    labels.get("topology.kubernetes.io/zone", "?"),
                    labels.get("node.kubernetes.io/instance-type", "?"),
                    per_node.get(node.metadata.name, 0),
                    notice,
                )
            )
        names = {n.metadata.name for n in nodes}
        if self._known_nodes is not None:
            for name in sorted(self._known_nodes - names):
                log(f"node {name}: gone")
            for name in sorted(names - self._known_nodes):
                log(f"node {name}: joined")
        self._known_nodes = names

        gateway_pods = [p for p in pods if (p.metadata.labels or {}).get("spotrag.io/component") == "gateway"]
        gateways_ready = sum(1 for p in gateway_pods if engine_state(p)[0] == "Ready")
        ragd = self._ragdeployment()
        status = (ragd or {}).get("status") or {}
        index = next((c for c in status.get("conditions") or [] if c.get("type") == "IndexReady"), {})
        index_text = "ready" if index.get("status") == "True" else (index.get("reason") or "building")
        return Snapshot(
            engines=engines,
            nodes=node_rows,
            gateways_ready=gateways_ready,
            gateways=len(gateway_pods),
            index=index_text,
            desired=status.get("desiredReplicas", 0),
            queued_tokens=queued_tokens(gateway_url),
            counts=counts,
            elapsed=time.monotonic() - self.started,
        )

    def _ragdeployment(self) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                "spotrag.io", "v1alpha1", self.namespace, "ragdeployments", self.deployment
            )
        except kubernetes.client.ApiException:
            return None


def render(snapshot: Snapshot, log_lines: list[str], phase: str, simulated: bool) -> Group:
    ready = sum(1 for e in snapshot.engines if e.state == "Ready")
    spot = sum(1 for e in snapshot.engines if e.capacity == "spot" and e.state in ("Ready", "Starting"))
    on_demand = sum(1 for e in snapshot.engines if e.capacity == "on-demand" and e.state in ("Ready", "Starting"))
    counts = snapshot.counts
    queued = "-" if snapshot.queued_tokens is None else f"{snapshot.queued_tokens:,}"
    header = Text.assemble(
        (f" {phase} ", "bold reverse"),
        f"  {snapshot.elapsed:5.0f}s   ",
        ("engines ", "bold"),
        f"{ready}/{snapshot.desired} ready ({on_demand} on-demand, {spot} spot)   ",
        ("gateways ", "bold"),
        f"{snapshot.gateways_ready}/{snapshot.gateways}   ",
        ("index ", "bold"),
        f"{snapshot.index}   ",
        ("queued tokens ", "bold"),
        f"{queued}   ",
        ("requests ", "bold"),
        f"{counts.served} served, ",
        (f"{counts.failed} failed", "red bold" if counts.failed else "green"),
        f", {counts.in_flight} in flight",
    )
    engines = Table(title="engines (pods the operator runs)", expand=True, title_justify="left")
    for column in ("pod", "capacity", "node", "state", "why"):
        engines.add_column(column, overflow="fold")
    for row in snapshot.engines:
        engines.add_row(
            row.name, row.capacity, row.node, Text(row.state, style=STATE_STYLES.get(row.state, "")), row.detail
        )
    nodes = Table(title="GPU nodes" + (" (simulated)" if simulated else ""), expand=True, title_justify="left")
    for column in ("node", "capacity", "zone", "instance", "engines", "notice"):
        nodes.add_column(column)
    for row in snapshot.nodes:
        nodes.add_row(
            row.name,
            row.capacity,
            row.zone,
            row.instance,
            str(row.engines),
            Text(row.notice, style="bold red" if row.notice else ""),
        )
    events = Text("\n".join(log_lines[-8:]) or "-", style="dim")
    return Group(header, engines, nodes, Text("recent changes", style="bold"), events)
