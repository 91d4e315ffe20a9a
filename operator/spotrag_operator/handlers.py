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
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

from . import metrics, render
from .autoscale import AutoscalerState, Observation, ScalingPolicy, decide
from .checks import find_problems
from .crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, defaulted_spec
from .engine_load import running_requests
from .index_job import reconcile_index
from .kube import Kube, KubeError, label_selector, load_api_client
from .placement import (
    DRAINING,
    PENDING,
    READY,
    STARTING,
    EngineView,
    PlacementState,
    SpotSettings,
    place,
)
from .plan import (
    ANNOTATION_DRAIN_DEADLINE,
    ANNOTATION_DRAIN_REASON,
    ANNOTATION_DRAIN_SINCE,
    DrainTiming,
    Engine,
    EnginePlan,
    plan_engines,
)
from .queued_tokens import read_queued_tokens
from .signals import node_signal
from .status import (
    cost_per_hour,
    engines_status,
    now_iso,
    set_condition,
    status_changed,
)

RAGD = (GROUP, VERSION, PLURAL)

# kopf reads timer intervals when the module is imported, so this one setting
# comes from the environment (the CLI sets it from --reconcile-interval).
RECONCILE_INTERVAL = float(os.environ.get("SPOTRAG_RECONCILE_INTERVAL", "10"))
API_RETRY_DELAY = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="spotrag.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="spotrag.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # kopf holds a deleted RAGDeployment (its finalizer) until the timer stops;
    # by default it then checks only every 60 s, delaying the garbage collection.
    settings.background.instant_exit_timeout = 5.0
    settings.background.cancellation_polling = 2.0
    if "kube" not in memo:
        memo["kube"] = Kube(load_api_client(os.environ.get("KUBECONFIG")))
    memo.setdefault("locks", {})
    memo.setdefault("scaling", {})
    memo.setdefault("locks_guard", threading.Lock())


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as our client: in-cluster, or
    the kubeconfig named now (kopf's own fallback reads $KUBECONFIG only as it
    was when the `kubernetes` package was imported)."""
    config = load_api_client(os.environ.get("KUBECONFIG")).configuration
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        trust_env=settings.networking.trust_env,
    )


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo["locks_guard"]:
        return memo["locks"].setdefault((namespace, name), threading.Lock())


FORBIDDEN_RETRY_DELAY = 60.0


def _temporary(error: KubeError, what: str, kube: Kube | None = None, body: dict | None = None) -> kopf.TemporaryError:
    """Every API failure is worth a retry: the spec is not at fault. A 403
    means the operator's RBAC lacks a permission: say which, where the user
    looks (the Degraded condition and an Event), and retry slowly."""
    if not error.forbidden or kube is None or body is None:
        return kopf.TemporaryError(f"{what}: {error}", delay=API_RETRY_DELAY)
    message = f"the operator is not allowed to {error.request()}: grant it in the operator's RBAC (charts/spotrag, templates/operator-rbac.yaml)"
    conditions = (body.get("status") or {}).get("conditions") or []
    previous = next((c for c in conditions if c.get("type") == "Degraded"), {})
    if previous.get("message") != message:
        kopf.warn(body, reason="Forbidden", message=message)
        degraded = set_condition(
            conditions,
            "Degraded",
            True,
            "Forbidden",
            message,
            now=datetime.datetime.now(datetime.UTC),
            generation=body["metadata"].get("generation"),
        )
        try:
            kube.patch(
                API_VERSION,
                KIND,
                body["metadata"]["name"],
                {"status": {"conditions": degraded}},
                body["metadata"]["namespace"],
                subresource="status",
            )
        except KubeError:
            pass  # may be forbidden too; the Event and the log still say it
    return kopf.TemporaryError(f"{what}: {message}", delay=FORBIDDEN_RETRY_DELAY)


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
        raise _temporary(error, "writing children", kube, body) from error
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


@kopf.on.event(*RAGD)
def ragdeployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted RAGDeployment leaves no metric series and no remembered state."""
    if type == "DELETED":
        meta = body["metadata"]
        metrics.forget(meta["namespace"], meta["name"])
        memo.get("scaling", {}).pop((meta["namespace"], meta["name"], meta.get("uid")), None)


@kopf.on.event("nodes")
def node_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A node announces it is going (or is cordoned): reconcile, at once, every
    RAGDeployment with an engine there, so its engines leave serving within a
    second of the signal rather than at the next timer tick."""
    if "kube" not in memo or node_signal(dict(body), datetime.datetime.now(datetime.UTC)) is None:
        return
    kube: Kube = memo["kube"]
    node_name = body["metadata"]["name"]
    try:
        pods = kube.list(
            "v1",
            "Pod",
            None,
            label_selector=f"{render.LABEL_COMPONENT}=engine",
            field_selector=f"spec.nodeName={node_name}",
        )
    except KubeError as error:
        raise _temporary(error, f"listing engines on node {node_name}") from error
    owners = {
        (pod["metadata"]["namespace"], owner["name"])
        for pod in pods
        for owner in pod["metadata"].get("ownerReferences") or []
        if owner.get("kind") == KIND
    }
    for namespace, name in sorted(owners):
        parent = kube.get(API_VERSION, KIND, name, namespace)
        if parent is not None and not parent["metadata"].get("deletionTimestamp"):
            _reconcile_engines_locked(kube, memo, parent, logger)


def _plain(body: kopf.Body) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": dict(body["metadata"]),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def _reconcile_engines_locked(kube: Kube, memo: kopf.Memo, body: dict, logger: logging.Logger | kopf.Logger) -> None:
    meta = body["metadata"]
    with _lock(memo, meta["namespace"], meta["name"]):
        try:
            # kopf's cached body can trail the status the previous reconcile wrote;
            # planning against it would post the same Events again.
            fresh = kube.get(API_VERSION, KIND, meta["name"], meta["namespace"])
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            body = fresh
            reconcile_engines(
                kube, body, logger=logger, now=datetime.datetime.now(datetime.UTC), memory=memo["scaling"]
            )
        except KubeError as error:
            raise _temporary(error, "reconciling engines", kube, body) from error


def drain_timing(spec: dict) -> DrainTiming:
    interruption = spec["interruption"]
    return DrainTiming(
        grace=interruption["preStopSeconds"],
        timeout=interruption["drainTimeoutSeconds"],
        # The pod needs its preStop wait plus a moment to stop before the node goes.
        margin=interruption["preStopSeconds"] + 5,
    )


def observe_engines(http: httpx.Client, pods: list[dict]) -> list[Engine]:
    """Engines as planning sees them; only draining ones are asked for their load,
    never a pod already being deleted (planning ignores it, and one on a node
    that is gone would hold the reconcile, and every drain, for the timeout)."""
    engines = []
    for pod in pods:
        draining = (pod["metadata"].get("labels") or {}).get(render.LABEL_SERVING) != "true" and not pod[
            "metadata"
        ].get("deletionTimestamp")
        engines.append(Engine.from_pod(pod, running_requests(http, pod) if draining else None))
    return engines


def placement_view(engine: Engine, nodes: dict[str, dict]) -> EngineView:
    node_labels = (nodes.get(engine.node or "") or {}).get("metadata", {}).get("labels") or {}
    phase = DRAINING if engine.draining else READY if engine.ready else STARTING if engine.node else PENDING
    return EngineView(
        name=engine.name,
        capacity=engine.capacity,
        phase=phase,
        since=engine.created.timestamp(),
        zone=node_labels.get("topology.kubernetes.io/zone"),
        instance_type=node_labels.get("node.kubernetes.io/instance-type"),
    )


@dataclass
class ScalingMemory:
    """The autoscaler's and placement's state between reconciles. Kept in
    memory and written to status when a decision changes or every
    PERSIST_EVERY seconds, so a restarted operator picks it up without
    every reconcile writing status."""

    autoscaler: AutoscalerState
    placement: PlacementState
    persisted_at: float


PERSIST_EVERY = 60.0


def _scaling_memory(memo: dict, body: dict) -> ScalingMemory:
    key = (body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"].get("uid"))
    memory = memo.get(key)
    if memory is None:
        stored = (body.get("status") or {}).get("scaling") or {}
        try:
            autoscaler = AutoscalerState.from_dict(stored.get("autoscaler"))
        except ValueError:
            autoscaler = AutoscalerState()
        try:
            placement = PlacementState.from_dict(stored.get("placement"))
        except ValueError:
            placement = PlacementState()
        memory = memo[key] = ScalingMemory(autoscaler, placement, persisted_at=0.0)
    return memory


def reconcile_engines(
    kube: Kube, body: dict, *, logger: Any, now: datetime.datetime, memory: dict, http: httpx.Client | None = None
) -> EnginePlan:
    """observe → decide (autoscale, place) → plan → execute → status, once."""
    spec = defaulted_spec(body)
    meta = body["metadata"]
    namespace = meta["namespace"]
    old_status = body.get("status") or {}
    selector = label_selector(render.engine_selector(body))
    pods = kube.list("v1", "Pod", namespace, label_selector=selector)
    nodes = {
        name: node
        for name in sorted({(p.get("spec") or {}).get("nodeName") for p in pods} - {None})
        if (node := kube.get("v1", "Node", name)) is not None
    }
    signals = {name: signal for name, node in nodes.items() if (signal := node_signal(node, now)) is not None}
    with http or httpx.Client() as client:
        engines = observe_engines(client, pods)
        queued, metric_problem = read_queued_tokens(kube, client, body, spec)

    # How many engines, and where.
    scaling = _scaling_memory(memory, body)
    live = [e for e in engines if not e.terminating and not e.failed]
    observation = Observation(
        now=now.timestamp(),
        queued_tokens=queued,
        ready=sum(1 for e in live if e.serving and e.ready),
        starting=sum(1 for e in live if e.serving and not e.ready),
        draining=sum(1 for e in live if e.draining),
        metric_problem=metric_problem,
    )
    decision, scaling.autoscaler = decide(ScalingPolicy.from_spec(spec), observation, scaling.autoscaler)
    placement, scaling.placement = place(
        desired=decision.desired,
        baseline=spec["scaling"]["onDemandBaseline"],
        settings=SpotSettings.from_spec(spec),
        engines=[placement_view(e, nodes) for e in live],
        state=scaling.placement,
        now=now.timestamp(),
    )
    if decision.changed:
        kopf.info(body, reason="Scaled", message=decision.message)
        metrics.SCALE_EVENTS.labels(
            namespace, meta["name"], "up" if decision.desired > decision.previous else "down"
        ).inc()
    old_scaling = old_status.get("scaling") or {}
    if placement.reason != old_scaling.get("placementReason"):
        post = kopf.warn if placement.reason == "SpotShort" else kopf.info
        post(body, reason=placement.reason, message=placement.message)

    spec_hash = render.engine_spec_hash(spec)
    plan = plan_engines(
        engines,
        target=placement.target,
        spec_hash=spec_hash,
        now=now,
        timing=drain_timing(spec),
        node_signals=signals,
        give_up=set(placement.give_up),
    )
    execute(kube, body, spec, plan, engines, now=now, logger=logger)
    if not plan.empty:
        engines = [Engine.from_pod(p) for p in kube.list("v1", "Pod", namespace, label_selector=selector)]

    problems = find_problems(kube, body, spec)
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
        desired=decision.desired,
        spec_hash=spec_hash,
        problems=problems,
        index=index,
        rollout_note=rollout_note,
        old_status=old_status,
        generation=meta.get("generation"),
        endpoint=render.endpoint_url(body),
        now=now,
    )
    status["queuedTokens"] = None if queued is None else int(round(queued))
    status["conditions"] = set_condition(
        status["conditions"],
        "ScalingActive",
        queued is not None,
        decision.reason,
        decision.message,
        now=now,
        generation=meta.get("generation"),
    )
    if scaling.autoscaler.last_scale_time is not None:
        status["lastScaleTime"] = now_iso(
            datetime.datetime.fromtimestamp(scaling.autoscaler.last_scale_time, datetime.UTC)
        )
    persist = (
        decision.changed
        or placement.reason != old_scaling.get("placementReason")
        or now.timestamp() - scaling.persisted_at >= PERSIST_EVERY
    )
    status["scaling"] = (
        {
            "autoscaler": scaling.autoscaler.to_dict(),
            "placement": scaling.placement.to_dict(),
            "placementReason": placement.reason,
        }
        if persist
        else old_scaling
    )
    metrics.record_engines(namespace, meta["name"], engines, decision.desired, queued, cost_per_hour(engines, spec))
    if status_changed(old_status, status):
        kube.patch(API_VERSION, KIND, meta["name"], {"status": status}, namespace, subresource="status")
        body["status"] = old_status | status
        if persist:
            scaling.persisted_at = now.timestamp()
    return plan


def execute(
    kube: Kube, body: dict, spec: dict, plan: EnginePlan, engines: list[Engine], *, now: datetime.datetime, logger: Any
) -> None:
    namespace = body["metadata"]["namespace"]
    by_name = {e.name: e for e in engines}
    for note in plan.notes:
        logger.info(note)
    for drain in plan.drain:
        # Out of serving first: the replacement below must not wait on a slow API.
        annotations = {
            ANNOTATION_DRAIN_SINCE: now_iso(now),
            ANNOTATION_DRAIN_REASON: drain.reason,
            ANNOTATION_DRAIN_DEADLINE: now_iso(drain.deadline),
        }
        try:
            kube.patch(
                "v1",
                "Pod",
                drain.name,
                {"metadata": {"labels": {render.LABEL_SERVING: "false"}, "annotations": annotations}},
                namespace,
            )
        except KubeError as error:
            if not error.not_found:
                raise
            continue
        cause = "interruption" if drain.interruption else drain.reason.split(":")[0]
        metrics.DRAINS.labels(namespace, body["metadata"]["name"], cause).inc()
        if drain.interruption is not None:
            metrics.INTERRUPTIONS.labels(namespace, body["metadata"]["name"], drain.interruption.source).inc()
            if drain.interruption.warning:
                kopf.warn(body, reason="InterruptionTimeUnparseable", message=drain.interruption.warning)
            kopf.warn(
                body,
                reason="EngineInterrupted",
                message=f"{drain.name}: {drain.reason}; out of serving, replacement started, deleted by {now_iso(drain.deadline)} at the latest",
            )
        else:
            kopf.info(body, reason="EngineDraining", message=f"{drain.name}: {drain.reason}")
    created = []
    for capacity in plan.create:
        pod = kube.create(render.engine_pod(body, spec, capacity))
        created.append(f"{pod['metadata']['name']} ({capacity})")
    if created:
        kopf.info(body, reason="EnginesCreated", message="created " + ", ".join(created))
    for name in plan.delete:
        if kube.delete("v1", "Pod", name, namespace):
            engine = by_name.get(name)
            took = (
                f" after draining {int((now - engine.drain_since).total_seconds())}s"
                if engine and engine.drain_since
                else ""
            )
            idle = " (idle)" if engine and engine.running_requests == 0 else ""
            kopf.info(body, reason="EngineDeleted", message=f"deleted {name}{took}{idle}")
