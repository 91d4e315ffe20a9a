"""A minimal Job controller (batch/v1): pods of the template until
`completions` succeeded, retried up to `backoffLimit` failures, with the
labels and status a Job's users read (`job-name` on the pods, conditions
Complete / Failed, succeeded and failed counts, completionTime)."""

from __future__ import annotations

import copy
import datetime
import logging
import time

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

from .controller import Controller, now_iso
from .deployments import owned_by
from .endpointslices import pod_is_ready

log = logging.getLogger(__name__)

EXPECTATION_TIMEOUT_SECONDS = 30.0


def job_finished(job: dict) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


class JobController(Controller):
    name = "job-controller"

    def __init__(self, client: AsyncKube, jobs: Informer, pods: Informer, *, resync: float, retry_delay: float):
        super().__init__(resync=resync)
        self.client = client
        self.jobs = jobs
        self.pods = pods
        self.retry_delay = retry_delay
        self.created: dict[str, dict[str, float]] = {}  # job uid → pods created, not yet seen
        jobs.subscribe(self.wake)
        pods.subscribe(self.wake)

    async def reconcile(self) -> None:
        if not (self.jobs.synced.is_set() and self.pods.synced.is_set()):
            return
        for job in self.jobs.items():
            if job["metadata"].get("deletionTimestamp") or job_finished(job):
                continue
            await self._reconcile_one(job)

    async def _reconcile_one(self, job: dict) -> None:
        meta, spec = job["metadata"], job["spec"]
        uid = meta["uid"]
        pods = [p for p in self.pods.items() if p["metadata"]["namespace"] == meta["namespace"] and owned_by(p, uid)]
        names = {p["metadata"]["name"] for p in pods}
        created = self.created.setdefault(uid, {})
        now = time.monotonic()
        for name, since in list(created.items()):
            if name in names or now - since > EXPECTATION_TIMEOUT_SECONDS:
                del created[name]
        if created:
            return
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        succeeded = phases.count("Succeeded")
        failed = phases.count("Failed")
        active = [
            p
            for p, phase in zip(pods, phases, strict=True)
            if phase not in ("Succeeded", "Failed") and not p["metadata"].get("deletionTimestamp")
        ]
        completions = spec.get("completions", 1) or 1
        parallelism = spec.get("parallelism", 1)
        backoff_limit = spec.get("backoffLimit", 6)
        status = dict(job.get("status") or {})
        status.setdefault("startTime", now_iso())
        conditions: list[dict] = []
        if succeeded >= completions:
            conditions = [
                self._condition(
                    "SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"
                ),
                self._condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
            ]
            status["completionTime"] = now_iso()
        elif failed > backoff_limit:
            conditions = [
                self._condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                self._condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
            ]
            for pod in active:
                await self.client.delete(object_path("v1", "pods", pod["metadata"]["name"], meta["namespace"]))
            active = []
        else:
            wanted = min(parallelism, completions - succeeded) - len(active)
            last_failure = max(
                (self._finished_at(p) for p in pods if (p.get("status") or {}).get("phase") == "Failed"), default=0.0
            )
            # Retries back off (10 s doubling in Kubernetes; the box's restart back-off here).
            if wanted > 0 and (not failed or time.time() - last_failure >= self.retry_delay * 2 ** (failed - 1)):
                for _ in range(wanted):
                    await self._create_pod(job)
        status |= {
            "active": len(active),
            "succeeded": succeeded,
            "failed": failed,
            "ready": sum(1 for p in active if pod_is_ready(p)),
        }
        if conditions:
            status["conditions"] = conditions
        if status != (job.get("status") or {}):
            try:
                await self.client.patch(
                    object_path("batch/v1", "jobs", meta["name"], meta["namespace"], "status"), {"status": status}
                )
            except KubeError as error:
                if error.status != 404:
                    raise

    @staticmethod
    def _condition(kind: str, reason: str, message: str) -> dict:
        return {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": now_iso(),
            "lastTransitionTime": now_iso(),
        }

    @staticmethod
    def _finished_at(pod: dict) -> float:
        stamps = [
            ((c.get("state") or {}).get("terminated") or {}).get("finishedAt")
            for c in (pod.get("status") or {}).get("containerStatuses") or []
        ]
        times = [datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps if s]
        return max(times, default=0.0)

    async def _create_pod(self, job: dict) -> None:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        job_labels = {
            "batch.kubernetes.io/controller-uid": meta["uid"],
            "batch.kubernetes.io/job-name": meta["name"],
            "controller-uid": meta["uid"],
            "job-name": meta["name"],
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "namespace": meta["namespace"],
                "labels": dict(pod_meta.get("labels") or {}) | job_labels,
                "annotations": dict(pod_meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template.get("spec") or {},
        }
        created = await self.client.create(collection_path("v1", "pods", meta["namespace"]), pod)
        self.created[meta["uid"]][created["metadata"]["name"]] = time.monotonic()
        log.info("job %s/%s: created pod %s", meta["namespace"], meta["name"], created["metadata"]["name"])
