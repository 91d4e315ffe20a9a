"""The index Job: started when the corpus changes, tracked into IndexReady.

A corpus hash (source, ConfigMap content, embedding model, prefixes,
chunking) names the Job, so a change starts a new one and an unchanged
corpus never rebuilds. The Job's result comes back in its pod's termination
message; older Jobs are deleted once a newer one has succeeded.

Pure: the operator reads the corpus ConfigMap, the Jobs and the current
Job's pods; `plan_index` says what IndexReady is and what to create or delete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from spotrag_runtime.kube.resources import label_selector

from . import render

CORPUS_HASH_ANNOTATION = "spotrag.io/corpus-hash"


@dataclass(frozen=True)
class IndexState:
    ready: bool | None  # None: unknown (nothing for the operator to build)
    reason: str
    message: str
    status: dict | None = None  # status.index
    started_job: str | None = None


@dataclass(frozen=True)
class IndexPlan:
    state: IndexState
    create: dict | None = None  # a Job manifest
    delete: tuple[str, ...] = ()  # Job names


def builds(spec: dict) -> bool:
    """Whether the operator builds this RAGDeployment's index (so has Jobs to read)."""
    retrieval = spec["retrieval"]
    corpus = retrieval.get("corpus") or {}
    return bool(retrieval["enabled"] and corpus and not corpus.get("uri"))


def job_labels(body: dict) -> str:
    return label_selector({render.LABEL_DEPLOYMENT: body["metadata"]["name"], render.LABEL_COMPONENT: "index"})


def corpus_digest(spec: dict, config_map: dict | None) -> str:
    content = ""
    if config_map is not None:
        content = json.dumps([config_map.get("data") or {}, config_map.get("binaryData") or {}], sort_keys=True)
    return render.corpus_hash(spec, content)


def current_job(jobs: list[dict], digest: str) -> dict | None:
    return next(
        (j for j in jobs if (j["metadata"].get("annotations") or {}).get(CORPUS_HASH_ANNOTATION) == digest), None
    )


def succeeded(job: dict) -> bool:
    return bool((job.get("status") or {}).get("succeeded"))


def _job_failed(job: dict) -> str | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("message") or condition.get("reason") or "failed"
    return None


def job_result(pods: list[dict]) -> dict:
    """The builder's JSON result, from the termination message of the Job's pod."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0 and terminated.get("message"):
                try:
                    return json.loads(terminated["message"])
                except json.JSONDecodeError:
                    continue
    return {}


def plan_index(body: dict, spec: dict, *, config_map: dict | None, jobs: list[dict], result: dict) -> IndexPlan:
    """`config_map`: the corpus ConfigMap (None: missing); `jobs`: the index
    Jobs; `result`: the current Job's result once it succeeded."""
    retrieval = spec["retrieval"]
    claim = render.index_claim_name(body, spec)
    if not retrieval["enabled"]:
        return IndexPlan(
            IndexState(True, "RetrievalDisabled", "retrieval is off: the gateway answers without passages")
        )
    corpus = retrieval.get("corpus")
    if not corpus:
        return IndexPlan(
            IndexState(
                None,
                "NoCorpus",
                f"retrieval.corpus is not set: gateways serve the index found on claim {claim} (build one with `spotrag index build`)",
            )
        )
    if corpus.get("uri"):
        return IndexPlan(
            IndexState(
                False,
                "UnsupportedCorpus",
                "retrieval.corpus.uri: the index Job of this version reads ConfigMaps and claims only; copy the documents to a claim and use corpus.persistentVolumeClaim",
            )
        )
    if (name := corpus.get("configMap")) and config_map is None:
        return IndexPlan(
            IndexState(
                False, "CorpusNotFound", f"ConfigMap {name!r} named by retrieval.corpus.configMap does not exist"
            )
        )
    digest = corpus_digest(spec, config_map)
    current = current_job(jobs, digest)
    if current is None:
        job = render.index_job(body, spec, digest)
        job_name = job["metadata"]["name"]
        state = IndexState(
            False, "Building", f"index Job {job_name} started for the current corpus", started_job=job_name
        )
        return IndexPlan(state, create=job)
    job_name = current["metadata"]["name"]
    if succeeded(current):
        older = tuple(
            j["metadata"]["name"] for j in jobs if j is not current and not j["metadata"].get("deletionTimestamp")
        )
        version, passages = result.get("version"), result.get("count")
        status = {"corpusHash": digest}
        if version:
            status["version"] = str(version)
        if isinstance(passages, int):
            status["passages"] = passages
        detail = f"version {version}, {passages} passages" if version else "built"
        return IndexPlan(IndexState(True, "IndexBuilt", f"index {detail} (Job {job_name})", status), delete=older)
    if failure := _job_failed(current):
        return IndexPlan(
            IndexState(
                False, "IndexJobFailed", f"index Job {job_name} failed: {failure}; see kubectl logs job/{job_name}"
            )
        )
    return IndexPlan(IndexState(False, "Building", f"index Job {job_name} is running"))
