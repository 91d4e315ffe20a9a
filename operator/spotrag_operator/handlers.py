"""kopf wiring: which Kubernetes events reconcile which RAGDeployment.

- create / update / resume of a RAGDeployment: ensure its children exist as
  rendered (render.static_children), then reconcile its engines;
- a timer, every change of one of its engine pods, and a node announcing
  it is going: reconcile its engines, as observe (observe.py) → decide
  (reconcile.py, pure) → execute (execute.py); a second, quicker timer for a
  RAGDeployment scaled to zero, whose gateways may be holding a request.

Handlers are sync: kopf runs them in worker threads, and the `kubernetes`
client they use is synchronous. A lock per RAGDeployment keeps the timer and
pod events from planning the same engines twice at once. Clients, locks and
the scaling memory live in kopf's `memo`; settings come in through
`register`, once, at start.
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

from spotrag_runtime.kube import Kube, KubeError, api_client

from . import metrics, render
from .crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, defaulted_spec
from .execute import execute, report_failure, retry_later
from .observe import observe
from .reconcile import ScalingMemory, plan_reconcile
from .signals import node_signal

RAGD = (GROUP, VERSION, PLURAL)
FIELD_MANAGER = "spotrag-operator"


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None  # None: in-cluster, else $KUBECONFIG or ~/.kube/config
    reconcile_interval: float = 10.0  # seconds between periodic reconciles of each RAGDeployment
    # A RAGDeployment scaled to zero is looked at this often: a request held by its
    # gateway waits on the operator to see it before any engine starts.
    zero_interval: float = 2.0


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register every handler into `registry`, configured by `config`."""

    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, memo, config)

    kopf.on.startup(registry=registry, id="configure")(startup)
    kopf.on.cleanup(registry=registry)(close_clients)
    kopf.on.login(registry=registry)(login)
    kopf.on.resume(*RAGD, registry=registry)(reconcile_children)
    kopf.on.create(*RAGD, registry=registry)(reconcile_children)
    kopf.on.update(*RAGD, field="spec", registry=registry)(reconcile_children)
    interval = config.reconcile_interval
    kopf.timer(*RAGD, interval=interval, initial_delay=interval, registry=registry)(reconcile_timer)
    if config.zero_interval < interval:
        kopf.timer(*RAGD, id="at_zero", interval=config.zero_interval, when=scaled_to_zero, registry=registry)(
            reconcile_timer
        )
    engine_pods = {render.LABEL_COMPONENT: "engine", render.LABEL_DEPLOYMENT: kopf.PRESENT}
    kopf.on.event("pods", labels=engine_pods, registry=registry)(engine_pod_changed)
    # A worker of an engine group (LeaderWorkerSet) changed: its group's readiness did.
    group_workers = {render.LABEL_COMPONENT: render.COMPONENT_WORKER, render.LABEL_DEPLOYMENT: kopf.PRESENT}
    kopf.on.event("pods", labels=group_workers, id="engine_worker_changed", registry=registry)(engine_pod_changed)
    kopf.on.event(*RAGD, registry=registry)(ragdeployment_event)
    kopf.on.event("nodes", registry=registry)(node_changed)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, config: OperatorConfig) -> None:
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
    memo["kube"] = Kube(api_client(config.kubeconfig), field_manager=FIELD_MANAGER)
    memo["http"] = httpx.Client()  # engines' and gateways' /metrics; shared by every reconcile
    memo["locks"] = {}
    memo["locks_guard"] = threading.Lock()
    memo["scaling"] = {}


def close_clients(memo: kopf.Memo, **_: Any) -> None:
    memo["http"].close()
    memo["kube"].api_client.close()


def login(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as our client (startup ran first)."""
    config = memo["kube"].api_client.configuration
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


def reconcile_children(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, old: Any = None, **_: Any) -> None:
    kube: Kube = memo["kube"]
    body = _plain(body)
    spec = defaulted_spec(body)
    changed = []
    try:
        for child in render.static_children(body, spec):
            outcome = kube.ensure(child)
            if outcome != "unchanged":
                changed.append(f"{outcome} {child['kind']} {child['metadata']['name']}")
        if _gateway_autoscaling_turned_off(old, spec):
            # The Deployment's replicas are the spec's again (written above): the HPA goes.
            name = render.resource_name(body, "gateway")
            if kube.delete("autoscaling/v2", "HorizontalPodAutoscaler", name, body["metadata"]["namespace"]):
                changed.append(f"deleted HorizontalPodAutoscaler {name}")
    except KubeError as error:
        report_failure(kube, body, error)
        raise retry_later(error, "writing children") from error
    if changed:
        logger.info("children: %s", ", ".join(changed))
        kopf.info(body, reason="Reconciled", message="; ".join(changed))
    reconcile_engines(memo, body, logger)


def _gateway_autoscaling_turned_off(old_spec: Any, spec: dict) -> bool:
    """An update (kopf's ``old`` of the spec) that removed gateway.autoscaling."""
    if not isinstance(old_spec, dict) or spec["gateway"].get("autoscaling"):
        return False
    return bool((old_spec.get("gateway") or {}).get("autoscaling"))


def reconcile_timer(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    reconcile_engines(memo, _plain(body), logger)


def scaled_to_zero(status: kopf.Status, **_: Any) -> bool:
    """No engine wanted (minReplicas 0, idle): a held request's queued tokens must be seen soon."""
    return status.get("desiredReplicas") == 0


def engine_pod_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """An engine pod appeared, changed or vanished: reconcile its RAGDeployment now."""
    if "kube" not in memo:  # events can arrive before startup finished
        return
    name = _owner_name(body)
    if name is None:
        return
    namespace = body["metadata"]["namespace"]
    try:
        parent = memo["kube"].get(API_VERSION, KIND, name, namespace)
    except KubeError as error:
        logger.warning("could not read RAGDeployment %s/%s: %s", namespace, name, error)
        return
    if parent is not None and not parent["metadata"].get("deletionTimestamp"):
        reconcile_engines(memo, parent, logger)


def ragdeployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted RAGDeployment leaves no metric series and no remembered state."""
    if type == "DELETED":
        meta = body["metadata"]
        metrics.forget(meta["namespace"], meta["name"])
        memo.get("scaling", {}).pop((meta["namespace"], meta["name"], meta.get("uid")), None)


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
            # Workers of an engine group too: a notice for any node of a group drains it.
            label_selector=f"{render.LABEL_COMPONENT} in (engine,{render.COMPONENT_WORKER})",
            field_selector=f"spec.nodeName={node_name}",
        )
    except KubeError as error:
        raise retry_later(error, f"listing engines on node {node_name}") from error
    owners = {(pod["metadata"]["namespace"], name) for pod in pods if (name := _owner_name(pod)) is not None}
    for namespace, name in sorted(owners):
        parent = kube.get(API_VERSION, KIND, name, namespace)
        if parent is not None and not parent["metadata"].get("deletionTimestamp"):
            reconcile_engines(memo, parent, logger)


def _owner_name(pod: Any) -> str | None:
    """The RAGDeployment an engine pod belongs to: its owner, or for a pod of an
    engine group (owned by its LeaderWorkerSet) the deployment label."""
    meta = pod["metadata"]
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == KIND), None)
    if owner is not None:
        return owner["name"]
    if render.LWS_NAME_LABEL in (meta.get("labels") or {}):
        return (meta.get("labels") or {}).get(render.LABEL_DEPLOYMENT)
    return None


def _plain(body: kopf.Body) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": dict(body["metadata"]),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo["locks_guard"]:
        return memo["locks"].setdefault((namespace, name), threading.Lock())


def reconcile_engines(memo: kopf.Memo, body: dict, logger: logging.Logger | kopf.Logger) -> None:
    """observe → decide → execute, once, under the RAGDeployment's lock."""
    kube: Kube = memo["kube"]
    meta = body["metadata"]
    with _lock(memo, meta["namespace"], meta["name"]):
        try:
            # kopf's cached body can trail the status the previous reconcile wrote;
            # planning against it would post the same Events again.
            fresh = kube.get(API_VERSION, KIND, meta["name"], meta["namespace"])
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            body = fresh
            key = (meta["namespace"], meta["name"], body["metadata"].get("uid"))
            now = datetime.datetime.now(datetime.UTC)
            plan = plan_reconcile(observe(kube, memo["http"], body, now=now), memo["scaling"].get(key))

            def remember(memory: ScalingMemory) -> None:
                memo["scaling"][key] = memory

            execute(kube, body, plan, now=now, remember=remember, logger=logger, http=memo["http"])
        except KubeError as error:
            report_failure(kube, body, error)
            raise retry_later(error, "reconciling engines") from error
