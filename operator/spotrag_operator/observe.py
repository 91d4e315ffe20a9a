"""Observe: one read of what exists for a RAGDeployment (its engine pods and
their nodes, the draining engines' load, the serving engines' vLLM counters
for calibration, the gateways' queued work, the objects its spec names, its
index Jobs), so deciding needs no cluster."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import httpx

from spotrag_runtime.kube import Kube, label_selector

from . import index_job, render
from .calibration import EngineSample
from .checks import named_objects
from .crd import defaulted_spec
from .engine_load import engine_samples, running_requests
from .plan import Engine
from .queued_tokens import QueuedWork, read_queued_work


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


def observe(kube: Kube, http: httpx.Client, body: dict, *, now: datetime.datetime) -> Observed:
    spec = defaulted_spec(body)
    namespace = body["metadata"]["namespace"]
    pods = kube.list("v1", "Pod", namespace, label_selector=label_selector(render.engine_selector(body)))
    nodes = {
        name: node
        for name in sorted({(p.get("spec") or {}).get("nodeName") for p in pods} - {None})
        if (node := kube.get("v1", "Node", name)) is not None
    }
    engines = observe_engines(http, pods)
    samples = engine_samples(http, pods, engines, now=now.timestamp())
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
    )
