"""Execute: write a reconcile's plan (reconcile.py), and report API failures.

The only module of the reconcile that writes: engine pods, the index Job,
Events, metrics and status, in the order the plan gives. An engine that
vanished meanwhile is skipped (its Events with it); any other API error
propagates, and kopf retries the handler.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable

import httpx
import kopf

from spotrag_runtime.kube import Kube, KubeError

from . import metrics, standby
from .crd import API_VERSION, KIND
from .reconcile import Event, ReconcilePlan, ScalingMemory, created_event
from .status import set_condition

API_RETRY_DELAY = 5.0
FORBIDDEN_RETRY_DELAY = 60.0


def post(body: dict, event: Event) -> None:
    (kopf.warn if event.warning else kopf.info)(body, reason=event.reason, message=event.message)


def execute(
    kube: Kube,
    body: dict,
    plan: ReconcilePlan,
    *,
    now: datetime.datetime,
    remember: Callable[[ScalingMemory], None],
    logger: logging.Logger | kopf.Logger,
    http: httpx.Client | None = None,  # for the engines' /wake_up (standbys)
) -> None:
    meta = body["metadata"]
    namespace = meta["namespace"]
    remember(plan.memory)
    for event in plan.announce:
        post(body, event)
    for sample in plan.counts:
        metrics.count(sample)
    for note in plan.notes:
        logger.info(note)
    for drain in plan.drains:
        # Out of serving first: the replacements below must not wait on a slow API.
        found = 0
        for api_version, kind, name in drain.targets or (("v1", "Pod", drain.name),):
            try:
                kube.patch(api_version, kind, name, drain.patch, namespace)
                found += 1
            except KubeError as error:
                if not error.not_found:
                    raise
        if not found:
            continue
        for sample in drain.counts:
            metrics.count(sample)
        for event in drain.events:
            post(body, event)
    created = _wake_standbys(kube, body, plan, http)
    created += [(kube.create(pod)["metadata"]["name"], capacity) for capacity, pod in plan.creates]
    if created:
        post(body, created_event(created))
    for delete in plan.deletes:
        if kube.delete(delete.api_version, delete.kind, delete.name, namespace):
            post(body, delete.event)
    if plan.index.create is not None:
        kube.create(plan.index.create)
    for job in plan.index.delete:
        kube.delete("batch/v1", "Job", job, namespace)
    for event in plan.report:
        post(body, event)
    for sleep in plan.sleeps:
        try:
            kube.patch("v1", "Pod", sleep.name, sleep.patch, namespace)
        except KubeError as error:
            if not error.not_found:
                raise
            continue
        standby.sleep_in_background(sleep.url)
    metrics.record(namespace, meta["name"], plan.gauges)
    if plan.status is not None:
        kube.patch(API_VERSION, KIND, meta["name"], {"status": plan.status}, namespace, subresource="status")
        if plan.persist:
            remember(dataclasses.replace(plan.memory, persisted_at=now.timestamp()))


def _wake_standbys(kube: Kube, body: dict, plan: ReconcilePlan, http: httpx.Client | None) -> list[tuple[str, str]]:
    """Wake each planned standby into the serving set; one that does not wake
    within its timeout is deleted and a cold engine created instead. Returns
    the cold engines created (name, capacity)."""
    namespace = body["metadata"]["namespace"]
    created = []
    for wake in plan.wakes:
        started = time.monotonic()
        problem = standby.wake(http, wake.url, timeout=wake.timeout) if http else "the operator has no HTTP client"
        if problem is None:
            try:
                kube.patch("v1", "Pod", wake.name, wake.patch, namespace)
            except KubeError as error:
                if not error.not_found:
                    raise
                problem = "the pod is gone"
            else:
                took = time.monotonic() - started
                post(
                    body,
                    Event(
                        "StandbyWoken",
                        f"woke {wake.name} in {took:.2f}s instead of starting a {wake.capacity} engine cold",
                    ),
                )
                continue
        post(
            body,
            Event(
                "StandbyWakeFailed",
                f"standby {wake.name} did not wake ({problem}); deleted, a cold {wake.capacity} engine replaces it",
                warning=True,
            ),
        )
        kube.delete("v1", "Pod", wake.name, namespace)
        created.append((kube.create(wake.fallback)["metadata"]["name"], wake.capacity))
    return created


def forbidden_message(error: KubeError) -> str:
    return (
        f"the operator is not allowed to {error.request()}: "
        "grant it in the operator's RBAC (charts/spotrag, templates/operator-rbac.yaml)"
    )


def retry_later(error: KubeError, what: str) -> kopf.TemporaryError:
    """Every API failure is worth a retry: the spec is not at fault. A 403
    (the operator's RBAC lacks a permission) is retried slowly."""
    if error.forbidden:
        return kopf.TemporaryError(f"{what}: {forbidden_message(error)}", delay=FORBIDDEN_RETRY_DELAY)
    return kopf.TemporaryError(f"{what}: {error}", delay=API_RETRY_DELAY)


def report_failure(kube: Kube, body: dict, error: KubeError) -> None:
    """A 403 is said where the user looks, once: the Degraded condition and an Event."""
    if not error.forbidden:
        return
    message = forbidden_message(error)
    conditions = (body.get("status") or {}).get("conditions") or []
    previous = next((c for c in conditions if c.get("type") == "Degraded"), {})
    if previous.get("message") == message:
        return
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
