"""Observe: one read of what exists for a RAGDeployment (its engine pods and
their nodes, the draining engines' load, the serving engines' vLLM counters
for calibration, the gateways' queued work, the objects its spec names, its
index Jobs), so deciding needs no cluster."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import httpx

from spotrag_runtime.kube import Kube, KubeError, label_selector

from . import index_job, render
from .calibration import EngineSample
from .checks import named_objects
from .crd import defaulted_spec
from .engine_load import engine_samples, running_requests
from .plan import Engine
from .queued_tokens import QueuedWork, read_queued_work
from .standby import Standby, is_sleeping, is_standby


@dataclass(frozen=True)
class Observed:
    body: dict  # the RAGDeployment as the API has it now
    spec: dict  # defaulted
    now: datetime.datetime
    engines: list[Engine]
    nodes: dict[str, dict]  # the engines' nodes by name
    # The gateways' queued work: tokens with their prompt/output parts, the
    # requests waiting and the TTFT histogram; None when it could not be read.
    work: QueuedWork | None
    metric_problem: str  # why work is None
    found: dict[tuple[str, str], dict | None]  # the objects the spec names, None where missing
    index_jobs: list[dict]
    index_result: dict  # the current index Job's result, once it succeeded
    samples: tuple[EngineSample, ...] = ()  # one scrape of each serving, ready engine, for calibration
    standbys: list[Standby] = field(default_factory=list)  # warm standby engines (spec.model.standby)

    @property
    def queued_tokens(self) -> float | None:
        return None if self.work is None else self.work.tokens


def observe_engines(http: httpx.Client, pods: list[dict]) -> list[Engine]:
    """Engines as planning sees them; only draining ones are asked for their load,
    never a pod already being deleted (planning ignores it, and one on a node
    that is gone would hold the reconcile, and every drain, for the timeout)."""
    engines = []
    for pod in pods:
        meta = pod["metadata"]
        draining = (meta.get("labels") or {}).get(render.LABEL_SERVING) != "true" and not meta.get("deletionTimestamp")
        engines.append(Engine.from_pod(pod, running_requests(http, pod) if draining else None))
    return engines


def observe_groups(http: httpx.Client, groups: list[dict], pods: list[dict]) -> list[Engine]:
    """Engine groups (LeaderWorkerSets) as planning sees them: one engine
    each, its pods (leader and workers) found by the LeaderWorkerSet's name
    label; only draining groups' leaders are asked for their load."""
    by_group: dict[str, list[dict]] = {}
    for pod in pods:
        by_group.setdefault((pod["metadata"].get("labels") or {}).get(render.LWS_NAME_LABEL, ""), []).append(pod)
    engines = []
    for lws in groups:
        meta = lws["metadata"]
        members = by_group.get(meta["name"], [])
        draining = (meta.get("labels") or {}).get(render.LABEL_SERVING) != "true" and not meta.get("deletionTimestamp")
        engine = Engine.from_group(lws, members)
        if draining and engine.leader is not None:
            leader = next(p for p in members if p["metadata"]["name"] == engine.leader)
            engine = Engine.from_group(lws, members, running_requests(http, leader))
        engines.append(engine)
    return engines


def group_pods(kube: Kube, body: dict) -> list[dict]:
    """Every pod of the RAGDeployment's engine groups, leaders and workers."""
    selector = f"{render.LABEL_DEPLOYMENT}={body['metadata']['name']},{render.LWS_NAME_LABEL}"
    return kube.list("v1", "Pod", body["metadata"]["namespace"], label_selector=selector)


def observe(kube: Kube, http: httpx.Client, body: dict, *, now: datetime.datetime) -> Observed:
    spec = defaulted_spec(body)
    namespace = body["metadata"]["namespace"]
    selector = label_selector(render.engine_selector(body))
    if render.nodes_per_engine(spec) > 1:
        groups = kube.list(render.LWS_API_VERSION, render.LWS_KIND, namespace, label_selector=selector)
        pods = group_pods(kube, body)
        # Single-node engine pods of an earlier spec roll out like any outdated engine.
        singles = [
            p
            for p in kube.list("v1", "Pod", namespace, label_selector=selector)
            if render.LWS_NAME_LABEL not in (p["metadata"].get("labels") or {}) and not is_standby(p)
        ]
        engines = observe_groups(http, groups, pods) + observe_engines(http, singles)
        pods = pods + singles
    else:
        pods = kube.list("v1", "Pod", namespace, label_selector=selector)
        engines = observe_engines(
            http,
            [p for p in pods if render.LWS_NAME_LABEL not in p["metadata"].get("labels", {}) and not is_standby(p)],
        )
        # Groups of an earlier spec (nodesPerEngine was above 1) roll out too; none
        # are listed when the LeaderWorkerSet API is not installed.
        groups = _groups_if_any(kube, namespace, selector)
        if groups:
            members = group_pods(kube, body)
            engines += observe_groups(http, groups, members)
            pods = pods + members
    nodes = {
        name: node
        for name in sorted({(p.get("spec") or {}).get("nodeName") for p in pods} - {None})
        if (node := kube.get("v1", "Node", name)) is not None
    }
    if any(e.group and e.unschedulable for e in engines):
        # A group that finds no nodes: every node, to say which would fit it.
        nodes = {n["metadata"]["name"]: n for n in kube.list("v1", "Node")} | nodes
    standbys = [Standby.from_pod(p, is_sleeping(http, p) if _ready(p) else None) for p in pods if is_standby(p)]
    # Calibration scrapes each engine where it serves: a group's leader, a single engine's pod.
    by_name = {p["metadata"]["name"]: p for p in pods}
    scraped = [(by_name[key], e) for e in engines if (key := e.leader if e.group else e.name) in by_name]
    samples = engine_samples(http, [p for p, _ in scraped], [e for _, e in scraped], now=now.timestamp())
    work, metric_problem = read_queued_work(kube, http, body, spec)
    found = {(kind, name): kube.get("v1", kind, name, namespace) for kind, name in named_objects(spec)}
    jobs: list[dict] = []
    result: dict = {}
    if index_job.builds(spec):
        corpus = spec["retrieval"]["corpus"]
        config_map = found.get(("ConfigMap", corpus.get("configMap") or ""))
        jobs = kube.list("batch/v1", "Job", namespace, label_selector=index_job.job_labels(body))
        current = index_job.current_job(jobs, index_job.corpus_digest(spec, config_map))
        if current is not None and index_job.succeeded(current):
            job_pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={current['metadata']['name']}")
            result = index_job.job_result(job_pods)
    return Observed(
        body=body,
        spec=spec,
        now=now,
        engines=engines,
        nodes=nodes,
        work=work,
        metric_problem=metric_problem,
        found=found,
        index_jobs=jobs,
        index_result=result,
        samples=tuple(samples),
        standbys=standbys,
    )


def _ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


def _groups_if_any(kube: Kube, namespace: str, selector: str) -> list[dict]:
    try:
        return kube.list(render.LWS_API_VERSION, render.LWS_KIND, namespace, label_selector=selector)
    except KubeError as error:
        # The LeaderWorkerSet API not installed, or not granted (RBAC of an older
        # chart): then there are no groups to clean up, and single-node engines
        # must not stop reconciling for it.
        if error.not_found or error.forbidden:
            return []
        raise
