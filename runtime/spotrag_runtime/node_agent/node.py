"""Marking this node's Node object: the agent's only write.

RBAC: ``nodes`` ``get`` and ``patch``, nothing else. A mark is one JSON patch
that sets the annotation and the taint together, so the operator never sees
one without the other, and that starts with a ``test`` of the resourceVersion
it was computed from: taints are a list, and a concurrent writer (kubelet,
NTH, Karpenter, a person cordoning) must not lose theirs. A failed test
(422) or a 409 means "someone wrote first": read again and retry.

``mark_patch`` and ``plan_mark`` are pure and tested as tables.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

import kubernetes
import urllib3

from spotrag_runtime.kube import JSON_PATCH, Kube, KubeError

from .clouds import most_urgent
from .mark import ANNOTATION, SOURCE, TAINT_KEY, InvalidNodeMark, Notice, parse_node_mark

logger = logging.getLogger("spotrag.node_agent")

MAX_CONFLICT_RETRIES = 8
# A mark whose deadline passed this long ago, while the cloud no longer shows
# its notice, is stale: the instance survived (stop/start, hibernate, host
# maintenance done) and the node must be schedulable again.
STALE_GRACE = timedelta(minutes=2)
# No answer from the API server at all (urllib3's errors are not OSErrors).
_TRANSPORT_ERRORS = (OSError, urllib3.exceptions.HTTPError)
_ANNOTATION_POINTER = "/metadata/annotations/" + ANNOTATION.replace("~", "~0").replace("/", "~1")


class NodeMarkError(Exception):
    """The Node could not be read or patched; ``status`` is the API's HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def mark_patch(node: Mapping[str, Any], notice: Notice | None) -> list[dict[str, Any]]:
    """The JSON patch that makes ``node`` carry ``notice`` (None: no mark); [] when it already does."""
    metadata = node.get("metadata") or {}
    annotations = metadata.get("annotations")
    spec = node.get("spec")
    taints = list((spec or {}).get("taints") or [])
    others = [t for t in taints if t.get("key") != TAINT_KEY]
    ours = notice.taint() if notice else None
    wanted_taints = others + ([ours] if ours else [])
    wanted_annotation = notice.to_annotation() if notice else None

    ops: list[dict[str, Any]] = []
    current_annotation = (annotations or {}).get(ANNOTATION)
    if wanted_annotation != current_annotation:
        if wanted_annotation is None:
            ops.append({"op": "remove", "path": _ANNOTATION_POINTER})
        elif annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: wanted_annotation}})
        else:
            ops.append({"op": "add", "path": _ANNOTATION_POINTER, "value": wanted_annotation})
    if wanted_taints != taints:
        if spec is None:
            ops.append({"op": "add", "path": "/spec", "value": {"taints": wanted_taints}})
        else:
            ops.append({"op": "add", "path": "/spec/taints", "value": wanted_taints})
    if not ops:
        return []
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": metadata.get("resourceVersion")}, *ops]


@dataclasses.dataclass(frozen=True)
class MarkPlan:
    action: Literal["keep", "write", "clear"]
    notice: Notice | None = None


KEEP = MarkPlan("keep")


def plan_mark(
    current: Notice | None,
    active: Iterable[Notice | None],
    now: datetime,
    *,
    all_observed: bool = True,
    grace: timedelta = STALE_GRACE,
) -> MarkPlan:
    """What to write, given the mark on the Node and the notices the cloud shows now.

    - the most urgent active notice is written unless the Node already has it,
      or has a more urgent one (a rebalance never hides an interruption);
    - a mark of ours that the cloud no longer shows, past its deadline plus
      ``grace``, is replaced or cleared, but only once every endpoint has
      answered (``all_observed``): an agent that just started knows nothing yet.
    """
    active = [n for n in active if n is not None]
    desired = most_urgent(active)
    if current is None:
        return MarkPlan("write", desired) if desired else KEEP
    if desired is not None and desired.same_notice(current):
        return KEEP
    shown = any(n.same_notice(current) for n in active)
    if all_observed and current.source == SOURCE and not shown and current.deadline + grace < now:
        return MarkPlan("write", desired) if desired else MarkPlan("clear")
    if desired is not None and (desired.severity, -desired.deadline.timestamp()) > (
        current.severity,
        -current.deadline.timestamp(),
    ):
        return MarkPlan("write", desired)
    return KEEP


class NodeMarker:
    """Reads and writes this node's mark. Blocking (the kubernetes client); the agent calls it in a thread."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        node_name: str,
        *,
        request_timeout: tuple[float, float] = (3.0, 10.0),
    ) -> None:
        self.kube = Kube(api_client, field_manager="spotrag-node-agent", request_timeout=request_timeout)
        self.node_name = node_name
        self.patches_sent = 0

    def _error(self, doing: str, exc: Exception) -> NodeMarkError:
        if isinstance(exc, KubeError):
            hint = {
                404: f"node {self.node_name!r} does not exist: is --node-name (or NODE_NAME) right?",
                401: "not authenticated to the Kubernetes API",
                403: "forbidden: the agent's ServiceAccount needs get and patch on nodes",
            }.get(exc.status, f"{exc.status} {exc.reason}: {exc.message[:200]}")
            return NodeMarkError(f"{doing} node {self.node_name}: {hint}", exc.status)
        return NodeMarkError(f"{doing} node {self.node_name}: Kubernetes API unreachable: {exc}")

    def read(self) -> dict[str, Any]:
        try:
            node = self.kube.get("v1", "Node", self.node_name)
        except (KubeError, ValueError, *_TRANSPORT_ERRORS) as exc:
            raise self._error("reading", exc) from exc
        if node is None:
            raise self._error("reading", KubeError(404, "NotFound", f"nodes {self.node_name!r} not found"))
        return node

    def current(self) -> Notice | None:
        """The node's mark; an unreadable one counts as none (the agent overwrites it)."""
        node = self.read()
        try:
            return parse_node_mark((node.get("metadata") or {}).get("annotations"))
        except InvalidNodeMark as exc:
            logger.warning("node %s carries an unreadable mark (%s); it will be replaced", self.node_name, exc)
            return None

    def write(self, notice: Notice | None) -> bool:
        """Make the node carry ``notice`` (None: remove the mark and our taint). True if a patch was sent."""
        for _ in range(MAX_CONFLICT_RETRIES):
            node = self.read()
            ops = mark_patch(node, notice)
            if not ops:
                return False
            try:
                self.kube.patch("v1", "Node", self.node_name, ops, content_type=JSON_PATCH)
            except KubeError as exc:
                if exc.status in (409, 422) and self._changed_since(ops[0]["value"]):
                    continue  # someone else wrote the node first: compute the patch again
                raise self._error("patching", exc) from exc
            except _TRANSPORT_ERRORS as exc:
                raise self._error("patching", exc) from exc
            self.patches_sent += 1
            return True
        raise NodeMarkError(
            f"patching node {self.node_name}: still conflicting after {MAX_CONFLICT_RETRIES} tries", 409
        )

    def _changed_since(self, resource_version: str | None) -> bool:
        return (self.read().get("metadata") or {}).get("resourceVersion") != resource_version
