"""kopf handlers: thin glue between Kubernetes events and the pure planners.

- create / update / resume of a RAGDeployment: ensure its children exist as
  rendered (render.static_children), then reconcile its engines;
- a timer, and every change of one of its engine pods: reconcile engines
  (plan.plan_engines → execute) and write status once if it changed.

Handlers are sync: kopf runs them in worker threads, and the `kubernetes`
client they use is synchronous. A lock per RAGDeployment keeps the timer and
pod events from planning the same engines twice at once.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from typing import Any

import kopf

from . import render
from .checks import find_problems
from .crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, defaulted_spec
from .index import reconcile_index
from .kube import Kube, KubeError, label_selector, load_api_client
from .plan import ANNOTATION_DRAIN_REASON, ANNOTATION_DRAIN_SINCE, Engine, EnginePlan, plan_engines
from .status import engines_status, now_iso, status_changed

RAGD = (GROUP, VERSION, PLURAL)

# kopf reads timer intervals when the module is imported, so this one setting
# comes from the environment (the CLI sets it from --reconcile-interval).
RECONCILE_INTERVAL = float(os.environ.get("SPOTRAG_RECONCILE_INTERVAL", "10"))
API_RETRY_DELAY = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="spotrag.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="spotrag.io", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    if "kube" not in memo:
        memo["kube"] = Kube(load_api_client(os.environ.get("KUBECONFIG")))
    memo.setdefault("locks", {})
    memo.setdefault("locks_guard", threading.Lock())


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo["locks_guard"]:
        return memo["locks"].setdefault((namespace, name), threading.Lock())


def _temporary(error: KubeError, what: str) -> kopf.TemporaryError:
    # Every API failure is worth a retry: the spec is not at fault.
    return kopf.TemporaryError(f"{what}: {error}", delay=API_RETRY_DELAY)


@kopf.on.resume(*RAGD)
@kopf.on.create(*RAGD)
@kopf.on.update(*RAGD, field="spec")
def reconcile_children(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    kube: Kube = memo["kube"]
    body = _plain(body)
    spec = defaulted_spec(body)
    changed = []
    try:
        for child in render.static_children(body, spec):
            outcome = kube.ensure(child)
            if outcome != "unchanged":
                changed.append(f"{outcome} {child['kind']} {child['metadata']['name']}")
    except KubeError as error:
        raise _temporary(error, "writing children") from error
    if changed:
        logger.info("children: %s", ", ".join(changed))
        kopf.info(body, reason="Reconciled", message="; ".join(changed))
    _reconcile_engines_locked(kube, memo, body, logger)


@kopf.timer(*RAGD, interval=RECONCILE_INTERVAL, initial_delay=RECONCILE_INTERVAL)
def reconcile_timer(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    _reconcile_engines_locked(memo["kube"], memo, _plain(body), logger)


@kopf.on.event("pods", labels={render.LABEL_COMPONENT: "engine", render.LABEL_DEPLOYMENT: kopf.PRESENT})
def engine_pod_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """An engine pod appeared, changed or vanished: reconcile its RAGDeployment now."""
    if "kube" not in memo:  # events can arrive before startup finished
        return
    kube: Kube = memo["kube"]
    owner = next((o for o in body["metadata"].get("ownerReferences") or [] if o.get("kind") == KIND), None)
    if owner is None:
        return
    namespace = body["metadata"]["namespace"]
    try:
        parent = kube.get(API_VERSION, KIND, owner["name"], namespace)
    except KubeError as error:
        logger.warning("could not read RAGDeployment %s/%s: %s", namespace, owner["name"], error)
        return
    if parent is None or parent["metadata"].get("deletionTimestamp"):
        return
    _reconcile_engines_locked(kube, memo, parent, logger)


def _plain(body: kopf.Body) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}


def _reconcile_engines_locked(kube: Kube, memo: kopf.Memo, body: dict, logger: logging.Logger | kopf.Logger) -> None:
    meta = body["metadata"]
    with _lock(memo, meta["namespace"], meta["name"]):
        try:
            reconcile_engines(kube, body, logger=logger, now=datetime.datetime.now(datetime.UTC))
        except KubeError as error:
            raise _temporary(error, "reconciling engines") from error


def desired_engines(spec: dict) -> int:
    """Engines wanted now. The autoscaler replaces this with its decision."""
    scaling = spec["scaling"]
    return max(0, min(scaling["minReplicas"], scaling["maxReplicas"]))


def reconcile_engines(kube: Kube, body: dict, *, logger: Any, now: datetime.datetime) -> EnginePlan:
    """observe → plan → execute → status, once."""
    spec = defaulted_spec(body)
    meta = body["metadata"]
    namespace = meta["namespace"]
    selector = label_selector(render.engine_selector(body))
    engines = [Engine.from_pod(p) for p in kube.list("v1", "Pod", namespace, label_selector=selector)]
    desired = desired_engines(spec)
    spec_hash = render.engine_spec_hash(spec)
    plan = plan_engines(
        engines,
        desired=desired,
        baseline=spec["scaling"]["onDemandBaseline"],
        spot_enabled=spec["spot"]["enabled"],
        spec_hash=spec_hash,
        now=now,
        drain_grace=spec["interruption"]["preStopSeconds"],
    )
    execute(kube, body, spec, plan, now=now, logger=logger)
    if not plan.empty:
        engines = [Engine.from_pod(p) for p in kube.list("v1", "Pod", namespace, label_selector=selector)]

    problems = find_problems(kube, body, spec)
    old_status = body.get("status") or {}
    index = reconcile_index(kube, body, spec)
    old_index = next((c for c in old_status.get("conditions") or [] if c.get("type") == "IndexReady"), {})
    if index.reason != old_index.get("reason"):
        post = kopf.warn if index.ready is False and index.reason != "Building" else kopf.info
        post(body, reason=f"Index{index.reason}", message=index.message)
    old_degraded = next((c for c in old_status.get("conditions") or [] if c.get("type") == "Degraded"), {})
    if problems and old_degraded.get("message") != "; ".join(problems):
        kopf.warn(body, reason="InvalidConfiguration", message="; ".join(problems))
    rollout_note = next((n for n in plan.notes if n.startswith("rollout")), None)
    status = engines_status(
        engines,
        spec=spec,
        desired=desired,
        spec_hash=spec_hash,
        problems=problems,
        index=index,
        rollout_note=rollout_note,
        old_status=old_status,
        generation=meta.get("generation"),
        endpoint=render.endpoint_url(body),
        now=now,
    )
    if status_changed(old_status, status):
        kube.patch(API_VERSION, KIND, meta["name"], {"status": status}, namespace, subresource="status")
        body["status"] = old_status | status
    return plan


def execute(kube: Kube, body: dict, spec: dict, plan: EnginePlan, *, now: datetime.datetime, logger: Any) -> None:
    namespace = body["metadata"]["namespace"]
    for note in plan.notes:
        logger.info(note)
    created = []
    for capacity in plan.create:
        pod = kube.create(render.engine_pod(body, spec, capacity))
        created.append(f"{pod['metadata']['name']} ({capacity})")
    if created:
        kopf.info(body, reason="EnginesCreated", message="created " + ", ".join(created))
    for drain in plan.drain:
        try:
            kube.patch(
                "v1", "Pod", drain.name,
                {"metadata": {"labels": {render.LABEL_SERVING: "false"}, "annotations": {ANNOTATION_DRAIN_SINCE: now_iso(now), ANNOTATION_DRAIN_REASON: drain.reason}}},
                namespace,
            )
        except KubeError as error:
            if not error.not_found:
                raise
            continue
        kopf.info(body, reason="EngineDraining", message=f"{drain.name}: {drain.reason}")
    for name in plan.delete:
        if kube.delete("v1", "Pod", name, namespace):
            kopf.info(body, reason="EngineDeleted", message=f"deleted {name}")
