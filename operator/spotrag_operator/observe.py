"""Observe: one read of what exists for a RAGDeployment (its engine pods and
their nodes, the draining engines' load, the gateways' queued tokens, the
objects its spec names, its index Jobs), so deciding needs no cluster."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import httpx

from spotrag_runtime.kube import Kube, label_selector

from . import index_job, render
from .checks import named_objects
from .crd import defaulted_spec
from .engine_load import running_requests
from .plan import Engine
from .queued_tokens import read_queued_tokens
from .standby import Standby, is_sleeping, is_standby


@dataclass(frozen=True)
class Observed:
    body: dict  # the RAGDeployment as the API has it now
    spec: dict  # defaulted
    now: datetime.datetime
    engines: list[Engine]
    nodes: dict[str, dict]  # the engines' nodes by name
    queued_tokens: float | None
    metric_problem: str  # why queued_tokens is None
    found: dict[tuple[str, str], dict | None]  # the objects the spec names, None where missing
    index_jobs: list[dict]
    index_result: dict  # the current index Job's result, once it succeeded
    standbys: list[Standby] = field(default_factory=list)  # warm standby engines (spec.model.standby)


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


def observe(kube: Kube, http: httpx.Client, body: dict, *, now: datetime.datetime) -> Observed:
    spec = defaulted_spec(body)
    namespace = body["metadata"]["namespace"]
    pods = kube.list("v1", "Pod", namespace, label_selector=label_selector(render.engine_selector(body)))
    nodes = {
        name: node
        for name in sorted({(p.get("spec") or {}).get("nodeName") for p in pods} - {None})
        if (node := kube.get("v1", "Node", name)) is not None
    }
    standbys = [Standby.from_pod(p, is_sleeping(http, p) if _ready(p) else None) for p in pods if is_standby(p)]
    engines = observe_engines(http, [p for p in pods if not is_standby(p)])
    queued, metric_problem = read_queued_tokens(kube, http, body, spec)
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
    return Observed(body, spec, now, engines, nodes, queued, metric_problem, found, jobs, result, standbys)


def _ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
