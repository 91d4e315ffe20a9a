"""The index Job: started when the corpus changes, tracked into IndexReady.

A corpus hash (source, ConfigMap content, embedding model, prefixes,
chunking) names the Job, so a change starts a new one and an unchanged
corpus never rebuilds. The Job's result comes back in its pod's termination
message; older Jobs are deleted once a newer one has succeeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import render
from .kube import Kube, label_selector


@dataclass(frozen=True)
class IndexState:
    ready: bool | None  # None: unknown (nothing for the operator to build)
    reason: str
    message: str
    status: dict | None = None  # status.index
    started_job: str | None = None


def _index_labels(body: dict) -> str:
    return label_selector({render.LABEL_DEPLOYMENT: body["metadata"]["name"], render.LABEL_COMPONENT: "index"})


def _job_failed(job: dict) -> str | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("message") or condition.get("reason") or "failed"
    return None


def _job_result(kube: Kube, job: dict) -> dict:
    """The builder's JSON result, from the termination message of the Job's pod."""
    namespace = job["metadata"]["namespace"]
    for pod in kube.list("v1", "Pod", namespace, label_selector=f"job-name={job['metadata']['name']}"):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0 and terminated.get("message"):
                try:
                    return json.loads(terminated["message"])
                except json.JSONDecodeError:
                    continue
    return {}


def reconcile_index(kube: Kube, body: dict, spec: dict) -> IndexState:
    retrieval = spec["retrieval"]
    namespace = body["metadata"]["namespace"]
    claim = render.index_claim_name(body, spec)
    if not retrieval["enabled"]:
        return IndexState(True, "RetrievalDisabled", "retrieval is off: the gateway answers without passages")
    corpus = retrieval.get("corpus")
    if not corpus:
        return IndexState(
            None,
            "NoCorpus",
            f"retrieval.corpus is not set: gateways serve the index found on claim {claim} (build one with `spotrag index build`)",
        )
    if corpus.get("uri"):
        return IndexState(
            False,
            "UnsupportedCorpus",
            "retrieval.corpus.uri: the index Job of this version reads ConfigMaps and claims only; copy the documents to a claim and use corpus.persistentVolumeClaim",
        )
    content = ""
    if name := corpus.get("configMap"):
        config_map = kube.get("v1", "ConfigMap", name, namespace)
        if config_map is None:
            return IndexState(
                False, "CorpusNotFound", f"ConfigMap {name!r} named by retrieval.corpus.configMap does not exist"
            )
        content = json.dumps([config_map.get("data") or {}, config_map.get("binaryData") or {}], sort_keys=True)
    digest = render.corpus_hash(spec, content)
    jobs = kube.list("batch/v1", "Job", namespace, label_selector=_index_labels(body))
    current = next(
        (j for j in jobs if (j["metadata"].get("annotations") or {}).get("spotrag.io/corpus-hash") == digest), None
    )
    if current is None:
        job = render.index_job(body, spec, digest)
        kube.create(job)
        return IndexState(
            False,
            "Building",
            f"index Job {job['metadata']['name']} started for the current corpus",
            started_job=job["metadata"]["name"],
        )
    job_name = current["metadata"]["name"]
    if (current.get("status") or {}).get("succeeded"):
        result = _job_result(kube, current)
        for old in jobs:
            if old is not current and not old["metadata"].get("deletionTimestamp"):
                kube.delete("batch/v1", "Job", old["metadata"]["name"], namespace)
        version, passages = result.get("version"), result.get("count")
        status = {"corpusHash": digest}
        if version:
            status["version"] = str(version)
        if isinstance(passages, int):
            status["passages"] = passages
        detail = f"version {version}, {passages} passages" if version else "built"
        return IndexState(True, "IndexBuilt", f"index {detail} (Job {job_name})", status)
    if failure := _job_failed(current):
        return IndexState(
            False, "IndexJobFailed", f"index Job {job_name} failed: {failure}; see kubectl logs job/{job_name}"
        )
    return IndexState(False, "Building", f"index Job {job_name} is running")
