"""The request handling of the Kubernetes API stand-in: a subclass of kmock's KubernetesEmulator.

kmock 0.8 stores objects (``emulator.objects``, with their history) and knows
the built-in resources (the discovery data it bundles); this subclass
serves them the way kube-apiserver does where kopf, the ``kubernetes`` client,
kubectl and helm look: server-set metadata and resourceVersions, PUT/PATCH with
every patch type, status and scale subresources, finalizers, graceful pod
deletion, garbage collection by ownerReferences, namespace and CRD lifecycle,
selectors, watches that resume from a resourceVersion, discovery, Tables, CRD
registration with admission (``admission.py``), and fault injection.

It replaces kmock's request entry point (``__call__``) rather than layering on
kmock's reaction DSL: kmock's URL parser misreads ``/api/v1/namespaces``, and
its request log is rescanned on every request. The request log here is bounded.

All state changes run synchronously on the event loop that serves the HTTP
requests, so one change is atomic with respect to every other request, watch and
garbage-collection pass.
"""

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import gzip
import importlib.resources
import json
import logging
import math
import random
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
import multidict
import yaml

from spotrag_box.apiserver import crd_admission as admission
from spotrag_box.apiserver import patches as kube_patches
from spotrag_box.apiserver import protobuf as kube_protobuf
from spotrag_box.apiserver import selectors as kube_selectors
from spotrag_box.apiserver import tables as kube_tables

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_LOG_SIZE = 5000
DEFAULT_CHANGE_LOG_SIZE = 5000  # watch resumption window; older resourceVersions get 410 Gone (bounds memory)
DEFAULT_WATCH_TIMEOUT = 1800.0  # kube-apiserver's --min-request-timeout
DEFAULT_BOOKMARK_INTERVAL = 60.0
HISTORY_PER_OBJECT = 20  # versions kept in kmock's object history (for assertions), bounded for memory
DELETED_OBJECTS_KEPT = 1000
DEFAULT_POD_GRACE_SECONDS = 30
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

# Bundled groups that are not part of a plain Kubernetes API server (k3s add-ons), or that
# are virtual review APIs a store cannot answer truthfully.
_SKIPPED_GROUPS = frozenset(
    {"metrics.k8s.io", "gateway.networking.k8s.io", "authentication.k8s.io", "authorization.k8s.io"}
)
_SERVED_SUBRESOURCES = frozenset({"status", "scale", "eviction", "binding"})
_CRD_VERBS = ("delete", "deletecollection", "get", "list", "patch", "create", "update", "watch")
_CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_PODS = kmock.resource("", "v1", "pods")
_PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
_CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
_FOREGROUND_FINALIZER = "foregroundDeletion"
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apiserver's generateName alphabet
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAMED_KINDS = frozenset({"Namespace", "Service"})

# kopf's peering resources, served as if their CRDs were installed (kopf.dev/v1).
KOPF_PEERINGS = {
    "clusterkopfpeerings": ("ClusterKopfPeering", False),
    "kopfpeerings": ("KopfPeering", True),
}


class ApiError(Exception):
    """An answer of the API server other than success, rendered as a meta/v1 Status."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it; ``status`` is the HTTP status it answered.

    ``id`` counts requests from 1 and never repeats, so ``requests(since=mark)``
    finds what came after a mark even once the bounded log has dropped old ones.
    """

    id: int
    method: str
    path: str
    query: dict[str, str]
    body: Any  # parsed JSON or YAML; text if neither; None if empty
    content_type: str = ""
    status: int | None = None


@dataclasses.dataclass
class _Fault:
    method: str
    path_regex: re.Pattern[str]
    status: int
    times: int


@dataclasses.dataclass(frozen=True)
class Served:
    """A resource as one URL names it: group/version/plural and what the server knows of it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str]
    list_kind: str
    storage_version: str
    crd: Mapping[str, Any] | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage(self) -> kmock.resource:
        return kmock.resource(self.group, self.storage_version, self.plural)

    @property
    def qualified(self) -> str:
        """As errors name a resource: 'pods', 'deployments.apps', 'ragdeployments.spotrag.io'."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def crd_version(self) -> Mapping[str, Any]:
        assert self.crd is not None
        return next(v for v in self.crd["spec"]["versions"] if v["name"] == self.version)

    def scale_paths(self) -> tuple[str, str, str | None] | None:
        """(specReplicasPath, statusReplicasPath, labelSelectorPath) if /scale is served."""
        if "scale" not in self.subresources:
            return None
        if self.crd is None:
            return ".spec.replicas", ".status.replicas", None  # Deployments, ReplicaSets, StatefulSets
        scale = (self.crd_version.get("subresources") or {}).get("scale") or {}
        return (
            scale.get("specReplicasPath", ".spec.replicas"),
            scale.get("statusReplicasPath", ".status.replicas"),
            scale.get("labelSelectorPath"),
        )


@dataclasses.dataclass(frozen=True)
class _Change:
    resource_version: int
    storage: kmock.resource
    type: str
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None


_CLOSE = object()  # queued to a watch to end it when the server stops


@dataclasses.dataclass(eq=False)
class _Watch:
    served: Served
    namespace: str | None
    labels: tuple[kube_selectors.Requirement, ...]
    fields: tuple[kube_selectors.FieldRequirement, ...]
    queue: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)

    def selects(self, obj: Mapping[str, Any] | None) -> bool:
        return (
            obj is not None
            and (self.namespace is None or obj["metadata"].get("namespace") == self.namespace)
            and kube_selectors.labels_match(self.labels, obj)
            and kube_selectors.fields_match(self.fields, obj)
        )

    def event_type(self, change: _Change) -> str | None:
        """What this watch sees of a change: an object leaving the selection reads as DELETED."""
        now, before = self.selects(change.obj), self.selects(change.old)
        if change.type == "MODIFIED":
            return "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
        return change.type if now else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.strip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, then by number (v2 > v1)."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (-1, 0, 0)
    stability = {"alpha": 0, "beta": 1, None: 2}[match[2]]
    return (stability, int(match[1]), int(match[3] or 0))


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _omit_empty_metadata(obj: dict[str, Any]) -> None:
    """Go's omitempty: an emptied list or map in metadata is absent, not [] or {}."""
    metadata = obj["metadata"]
    for key in ("finalizers", "ownerReferences", "labels", "annotations"):
        if key in metadata and not metadata[key]:
            del metadata[key]


def _content(obj: Mapping[str, Any], *, without_status: bool) -> dict[str, Any]:
    """What a generation counts: everything but metadata (and status, when it is a subresource)."""
    skipped = {"metadata", "apiVersion", "kind"} | ({"status"} if without_status else set())
    return {key: value for key, value in obj.items() if key not in skipped}


def _without_resource_version(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": metadata}


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator, completed to behave as kube-apiserver does for its clients."""

    server_version: str = "v1.36.0"
    graceful_pod_deletion: bool = True
    request_log_size: int = DEFAULT_REQUEST_LOG_SIZE
    change_log_size: int = DEFAULT_CHANGE_LOG_SIZE
    bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL
    server_address: str = "127.0.0.1:6443"

    _rv: int = attrs.field(default=1, init=False)
    _crds: dict[tuple[str, str], dict[str, Any]] = attrs.field(factory=dict, init=False)
    _changes: collections.deque[_Change] = attrs.field(factory=collections.deque, init=False)
    _oldest_resumable_rv: int = attrs.field(default=0, init=False)
    _watches: set[_Watch] = attrs.field(factory=set, init=False)
    _deleted_keys: collections.OrderedDict[Any, None] = attrs.field(factory=collections.OrderedDict, init=False)
    _log: collections.deque[RecordedRequest] = attrs.field(init=False)
    _log_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _request_count: int = attrs.field(default=0, init=False)
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _faults_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _gc_scheduled: bool = attrs.field(default=False, init=False)
    _cluster_ips: Iterator[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._log = collections.deque(maxlen=self.request_log_size)
        self._cluster_ips = (f"10.96.{n // 254}.{n % 254 + 1}" for n in range(1, 65000))
        self._register_builtins()
        for namespace in INITIAL_NAMESPACES:
            self.create(self._served_of(_NAMESPACES), None, {"metadata": {"name": namespace}})

    # --- the registry of served resources ---------------------------------------------------------

    def _register_builtins(self) -> None:
        data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
        documents = json.loads(gzip.decompress(data))
        self.resources.load_data(
            json.dumps([doc for doc in documents if doc["groupVersion"].rpartition("/")[0] not in _SKIPPED_GROUPS])
        )
        for plural, (kind, namespaced) in KOPF_PEERINGS.items():
            self.resources[kmock.resource("kopf.dev", "v1", plural)] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=_CRD_VERBS
            )

    def _served_of(self, resource: kmock.resource) -> Served:
        info = self.resources[resource]
        crd = self._crds.get((resource.group, resource.plural))
        storage_version = resource.version
        list_kind = f"{info.kind}List"
        if crd is not None:
            storage_version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
            list_kind = crd["spec"]["names"].get("listKind") or list_kind
        return Served(
            group=resource.group,
            version=resource.version,
            plural=resource.plural,
            kind=info.kind,
            namespaced=bool(info.namespaced),
            subresources=frozenset(info.subresources) & _SERVED_SUBRESOURCES,
            list_kind=list_kind,
            storage_version=storage_version,
            crd=crd,
        )

    def lookup(self, group: str, version: str, plural: str) -> Served | None:
        resource = kmock.resource(group, version, plural)
        return self._served_of(resource) if resource in self.resources else None

    def _served_for_storage(self, storage: kmock.resource) -> Served:
        """The resource a stored object is served as (its storage version, or any served one)."""
        if storage in self.resources:
            return self._served_of(storage)
        for resource in self.resources:
            if (resource.group, resource.plural) == (storage.group, storage.plural):
                return self._served_of(resource)
        raise LookupError(f"{storage.plural}.{storage.group} is no longer served")

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        self._unregister_crd(spec["group"], names["plural"])
        self._crds[(spec["group"], names["plural"])] = dict(crd)
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = set((version.get("subresources") or {}).keys()) & {"status", "scale"}
            self.resources[kmock.resource(spec["group"], version["name"], names["plural"])] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs=_CRD_VERBS,
                shortnames=names.get("shortNames") or [],
                categories=names.get("categories") or [],
                subresources=subresources,
            )

    def _unregister_crd(self, group: str, plural: str) -> None:
        self._crds.pop((group, plural), None)
        for resource in [r for r in self.resources if r.group == group and r.plural == plural]:
            del self.resources[resource]

    # --- the object store (kmock's ObjectsArray) -------------------------------------------------

    def _key(self, served: Served, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return (served.storage, namespace if served.namespaced else None, name)

    def _current(self, served: Served, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = self._key(served, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _live(self, storage: kmock.resource | None = None) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        for key, obj in list(self.objects.items()):
            if (storage is None or key[0] == storage) and not obj.deleted:
                yield key, obj.raw

    def _select(
        self,
        served: Served,
        namespace: str | None,
        labels: tuple[kube_selectors.Requirement, ...],
        fields: tuple[kube_selectors.FieldRequirement, ...],
    ) -> list[dict[str, Any]]:
        found = [
            obj
            for (_, ns, _), obj in self._live(served.storage)
            if (namespace is None or ns == namespace)
            and kube_selectors.labels_match(labels, obj)
            and kube_selectors.fields_match(fields, obj)
        ]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    def _next_resource_version(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _commit(self, served: Served, change_type: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Store a change, remember it for watch resumption, and hand it to the open watches."""
        key = self._key(served, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if change_type == "ADDED":
            if key in self.objects:
                self.objects[key].create(obj)
                self._deleted_keys.pop(key, None)
            else:
                self.objects[key] = obj
        elif change_type == "MODIFIED":
            history = self.objects[key].history
            history.append(obj)
            if len(history) > HISTORY_PER_OBJECT:
                del history[:-HISTORY_PER_OBJECT]
        else:
            self.objects[key].history.append(obj)  # the final state, then the deletion marker
            self.objects[key].delete()
            self._forget_old_deleted(key)
            self._schedule_garbage_collection()
        change = _Change(int(obj["metadata"]["resourceVersion"]), served.storage, change_type, obj, old)
        if len(self._changes) >= self.change_log_size:
            self._oldest_resumable_rv = self._changes.popleft().resource_version
        self._changes.append(change)
        for watch in list(self._watches):
            if watch.served.storage == served.storage:
                event_type = watch.event_type(change)
                if event_type is not None:
                    watch.queue.put_nowait((event_type, obj))

    def _forget_old_deleted(self, key: Any) -> None:
        self._deleted_keys[key] = None
        while len(self._deleted_keys) > DELETED_OBJECTS_KEPT:
            oldest, _ = self._deleted_keys.popitem(last=False)
            if oldest in self.objects and self.objects[oldest].deleted:
                del self.objects[oldest]

    # --- writes ------------------------------------------------------------------------------------

    def create(
        self, served: Served, namespace: str | None, body: Any, *, dry_run: bool = False, field_validation: str = "Warn"
    ) -> tuple[dict[str, Any], list[str]]:
        """Create an object as POST does; returns it and the warnings for the response."""
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(dict(body))
        self._check_kind(served, obj)
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if served.namespaced:
            body_namespace = metadata.get("namespace")
            if namespace is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if body_namespace not in (None, "", namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            metadata["namespace"] = namespace
            self._check_namespace_accepts(namespace)
        else:
            metadata.pop("namespace", None)
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise self._invalid(
                    served,
                    "",
                    [
                        admission.FieldError(
                            "metadata.name", "Required value: name or generateName is required", "FieldValueRequired"
                        )
                    ],
                )
            metadata["name"] = self._generated_name(served, namespace, metadata["generateName"])
        self._check_name(served, metadata["name"])
        if self._current(served, namespace, metadata["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{served.qualified} "{metadata["name"]}" already exists',
                {"name": metadata["name"], "group": served.group, "kind": served.plural},
            )
        if "status" in served.subresources and served.kind != "Node":
            obj.pop("status", None)  # status is written through /status (kubelets register Nodes with it)
        obj, warnings = self._admit(served, obj, None, field_validation)
        self._prepare_builtin_create(served, obj)
        _omit_empty_metadata(obj)
        metadata = obj["metadata"]
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            metadata.pop(server_owned, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        metadata["generation"] = 1
        if dry_run:
            metadata["resourceVersion"] = str(self._rv)
            return obj, warnings
        metadata["resourceVersion"] = self._next_resource_version()
        self._commit(served, "ADDED", obj, None)
        if served.storage == _CRD_RESOURCE:
            self._register_crd(obj)
        return obj, warnings

    def update(
        self,
        served: Served,
        namespace: str | None,
        name: str,
        proposed: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str]]:
        """Replace an object (PUT, and every PATCH once applied); status and metadata rules as the server's."""
        current = self._existing(served, namespace, name)
        if not isinstance(proposed, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        new = copy.deepcopy(dict(proposed))
        self._check_kind(served, new)
        metadata = new.setdefault("metadata", {})
        if metadata.get("name") not in (None, name):
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})",
            )
        if metadata.get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
            raise self._conflict(served, name)
        if subresource == "status":
            new = {**copy.deepcopy(current), "status": new.get("status")}
            if new["status"] is None:
                del new["status"]
        elif "status" in served.subresources:
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        metadata = new["metadata"]
        for immutable in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ):
            if immutable in current["metadata"]:
                metadata[immutable] = current["metadata"][immutable]
            else:
                metadata.pop(immutable, None)
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        added_finalizers = set(metadata.get("finalizers") or []) - set(current["metadata"].get("finalizers") or [])
        if current["metadata"].get("deletionTimestamp") and added_finalizers:
            raise self._invalid(
                served,
                name,
                [
                    admission.FieldError(
                        "metadata.finalizers",
                        f"Forbidden: no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers {sorted(added_finalizers)}",
                        "FieldValueForbidden",
                    )
                ],
            )
        new, warnings = self._admit(served, new, current, field_validation)
        _omit_empty_metadata(new)
        without_status = "status" in served.subresources
        if _content(new, without_status=without_status) != _content(current, without_status=without_status):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if _without_resource_version(new) == _without_resource_version(current):
            return current, warnings  # a no-op write: no new resourceVersion, no watch event
        if dry_run:
            return new, warnings
        new["metadata"]["resourceVersion"] = self._next_resource_version()
        if self._ready_to_go(served, new):
            self._commit(served, "DELETED", new, current)
        else:
            self._commit(served, "MODIFIED", new, current)
        if served.storage == _CRD_RESOURCE and not new["metadata"].get("deletionTimestamp"):
            self._register_crd(new)
        return new, warnings

    def patch(
        self,
        served: Served,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str = "Warn",
        field_manager: str | None = None,
    ) -> tuple[dict[str, Any], list[str], int]:
        """Apply a PATCH; returns the object, warnings and the status code (201 when apply created it)."""
        if content_type not in kube_patches.PATCH_TYPES:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - "
                f"accepted media types include: {', '.join(kube_patches.PATCH_TYPES)}",
            )
        if served.crd is not None and content_type == kube_patches.STRATEGIC_MERGE_PATCH:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - "
                "accepted media types include: application/json-patch+json, "
                "application/merge-patch+json, application/apply-patch+yaml",
            )
        if content_type == kube_patches.APPLY_PATCH and not field_manager:
            raise ApiError(400, "BadRequest", "PATCH requests with apply patch type must specify a fieldManager")
        current = self._current(served, namespace, name)
        if current is None and content_type == kube_patches.APPLY_PATCH and subresource is None:
            if not isinstance(patch, Mapping):
                raise ApiError(400, "BadRequest", "the apply patch must be an object")
            created, warnings = self.create(
                served, namespace, patch, dry_run=dry_run, field_validation=field_validation
            )
            return created, warnings, 201
        current = self._existing(served, namespace, name)
        try:
            patched = kube_patches.apply_patch(content_type, current, patch, strategic=served.crd is None)
        except kube_patches.PatchError as e:
            raise ApiError(e.status, _REASONS.get(e.status, "Invalid"), str(e)) from e
        updated, warnings = self.update(
            served,
            namespace,
            name,
            patched,
            subresource=subresource,
            dry_run=dry_run,
            field_validation=field_validation,
        )
        return updated, warnings, 200

    def delete(
        self,
        served: Served,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """DELETE: finalizers block, graceful pods wait for their kubelet, dependents follow the owner."""
        options = options or {}
        current = self._existing(served, namespace, name)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, current["metadata"].get(field)):
                raise self._conflict(
                    served,
                    name,
                    f"Precondition failed: {field}: {preconditions[field]}, "
                    f"{field} in object meta: {current['metadata'].get(field)}",
                )
        if dry_run:
            return current
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(
                400,
                "BadRequest",
                f"propagationPolicy: Unsupported value: {json.dumps(policy)}: "
                f'supported values: "Foreground", "Background", "Orphan"',
            )
        if policy == "Orphan":
            self._orphan_dependents(current["metadata"]["uid"])
        new = copy.deepcopy(current)
        metadata = new["metadata"]
        grace = self._grace_seconds(served, current, options)
        finalizers = list(metadata.get("finalizers") or [])
        if policy == "Foreground" and _FOREGROUND_FINALIZER not in finalizers and self._has_dependents(metadata["uid"]):
            finalizers.append(_FOREGROUND_FINALIZER)
        if served.storage == _NAMESPACES:
            new.setdefault("status", {})["phase"] = "Terminating"
        if served.storage == _CRD_RESOURCE and _CRD_CLEANUP_FINALIZER not in finalizers:
            finalizers.append(_CRD_CLEANUP_FINALIZER)
        if finalizers:
            metadata["finalizers"] = finalizers
        if metadata.get("deletionTimestamp"):
            if grace is not None and grace < (metadata.get("deletionGracePeriodSeconds") or 0):
                metadata["deletionGracePeriodSeconds"] = grace  # a shorter grace period, e.g. the kubelet's 0
            elif new == current:
                return current
        else:
            metadata["deletionTimestamp"] = (
                datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=grace or 0)
            ).strftime("%Y-%m-%dT%H:%M:%SZ")
            metadata["deletionGracePeriodSeconds"] = grace or 0
            metadata["generation"] = metadata.get("generation", 1) + 1
        metadata["resourceVersion"] = self._next_resource_version()
        if self._ready_to_go(served, new):
            self._commit(served, "DELETED", new, current)
        else:
            self._commit(served, "MODIFIED", new, current)
            self._schedule_garbage_collection()
        return new

    def _grace_seconds(self, served: Served, obj: Mapping[str, Any], options: Mapping[str, Any]) -> int | None:
        """Pods on a node get a grace period: they stay Terminating until their kubelet deletes them."""
        requested = options.get("gracePeriodSeconds")
        if served.storage != _PODS or not self.graceful_pod_deletion or not obj.get("spec", {}).get("nodeName"):
            return 0 if requested is not None else None
        if requested is not None:
            return max(int(requested), 0)
        return int(obj["spec"].get("terminationGracePeriodSeconds", DEFAULT_POD_GRACE_SECONDS))

    def _ready_to_go(self, served: Served, obj: Mapping[str, Any]) -> bool:
        """Whether a deleted object can leave: no finalizers, no grace left, and (namespaces) no content."""
        metadata = obj["metadata"]
        ready = bool(
            metadata.get("deletionTimestamp")
            and not metadata.get("finalizers")
            and not metadata.get("deletionGracePeriodSeconds")
        )
        if ready and served.storage == _NAMESPACES:
            return self._namespace_is_empty(metadata["name"])
        return ready

    def _existing(self, served: Served, namespace: str | None, name: str) -> dict[str, Any]:
        current = self._current(served, namespace, name)
        if current is None:
            raise ApiError(
                404,
                "NotFound",
                f'{served.qualified} "{name}" not found',
                {"name": name, "group": served.group, "kind": served.plural},
            )
        return current

    def _check_kind(self, served: Served, obj: dict[str, Any]) -> None:
        if obj.get("kind") not in (None, "", served.kind):
            raise ApiError(
                400,
                "BadRequest",
                f"the kind of the object ({obj['kind']}) does not match "
                f"the resource {served.qualified} ({served.kind})",
            )
        if obj.get("apiVersion") not in (None, "", served.api_version):
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({obj['apiVersion']}) does not match "
                f"the expected API version ({served.api_version})",
            )
        obj["apiVersion"], obj["kind"] = served.api_version, served.kind

    def _check_name(self, served: Served, name: str) -> None:
        as_label = served.kind in _LABEL_NAMED_KINDS
        pattern, limit = (_DNS_LABEL, 63) if as_label else (_DNS_SUBDOMAIN, 253)
        if len(name) > limit or not pattern.match(name):
            kind_of_name = "RFC 1123 label" if as_label else "RFC 1123 subdomain"
            raise self._invalid(
                served,
                name,
                [
                    admission.FieldError(
                        "metadata.name",
                        f"Invalid value: {json.dumps(name)}: a lowercase {kind_of_name} must consist of "
                        f"lower case alphanumeric characters{'' if as_label else ', ' + repr('.')}"
                        f" or '-', and must start and end with an alphanumeric character",
                    )
                ],
            )

    def _check_namespace_accepts(self, namespace: str) -> None:
        existing = self._current(self._served_of(_NAMESPACES), None, namespace)
        if existing is None:
            raise ApiError(
                404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"}
            )
        if existing["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )

    def _generated_name(self, served: Served, namespace: str | None, prefix: str) -> str:
        while True:
            name = prefix[:58] + "".join(random.choices(_NAME_CHARS, k=5))
            if self._current(served, namespace, name) is None:
                return name

    def _admit(
        self, served: Served, obj: dict[str, Any], old: dict[str, Any] | None, field_validation: str
    ) -> tuple[dict[str, Any], list[str]]:
        """Custom resources go through their CRD's schema (defaults, pruning, validation, CEL)."""
        if served.crd is None:
            if served.storage == _CRD_RESOURCE:
                errors = admission.check_crd(obj)
                if errors:
                    raise self._invalid(served, obj["metadata"]["name"], errors)
            return obj, []
        result = admission.admit_custom_resource(served.crd, obj, old)
        if result.errors:
            raise self._invalid(served, obj["metadata"].get("name", ""), result.errors)
        if result.unknown_fields and field_validation == "Strict":
            unknown = ", ".join(f'unknown field "{field}"' for field in result.unknown_fields)
            raise ApiError(400, "BadRequest", f"strict decoding error: {unknown}")
        warnings = [f'unknown field "{field}"' for field in result.unknown_fields] if field_validation == "Warn" else []
        return result.object, warnings

    def _invalid(self, served: Served, name: str, errors: list[admission.FieldError]) -> ApiError:
        return ApiError(
            422,
            "Invalid",
            admission.invalid_message(served.kind, served.group, name, errors),
            {
                "name": name,
                "group": served.group,
                "kind": served.kind,
                "causes": [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors],
            },
        )

    def _conflict(self, served: Served, name: str, why: str | None = None) -> ApiError:
        why = why or "the object has been modified; please apply your changes to the latest version and try again"
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {served.qualified} "{name}": {why}',
            {"name": name, "group": served.group, "kind": served.plural},
        )

    def _prepare_builtin_create(self, served: Served, obj: dict[str, Any]) -> None:
        """What the built-in registries set on create (the parts clients look at)."""
        match served.kind:
            case "Pod":
                obj["status"] = {"phase": "Pending"}
            case "Namespace":
                obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
                obj["status"] = {"phase": "Active"}
            case "Service":
                spec = obj.setdefault("spec", {})
                spec.setdefault("type", "ClusterIP")
                if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                    spec["clusterIP"] = next(self._cluster_ips)
                if spec.get("clusterIP"):
                    spec.setdefault("clusterIPs", [spec["clusterIP"]])
            case "CustomResourceDefinition":
                names = obj["spec"]["names"]
                obj["status"] = {
                    "acceptedNames": names,
                    "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
                    "conditions": [
                        {
                            "type": condition,
                            "status": "True",
                            "reason": reason,
                            "message": message,
                            "lastTransitionTime": _now(),
                        }
                        for condition, reason, message in [
                            ("NamesAccepted", "NoConflicts", "no conflicts found"),
                            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                        ]
                    ],
                }

    # --- garbage collection, namespace and CRD cleanup -----------------------------------------

    def _schedule_garbage_collection(self) -> None:
        if not self._gc_scheduled:
            self._gc_scheduled = True
            asyncio.get_running_loop().call_soon(self._collect_garbage)

    def _collect_garbage(self) -> None:
        """One pass of what kube-controller-manager's garbage collector and namespace controller do."""
        self._gc_scheduled = False
        progress = True
        while progress:
            progress = False
            live = list(self._live())
            by_uid = {obj["metadata"]["uid"]: obj for _, obj in live}
            for key, _ in live:
                progress |= self._collecting(self._collect_dependent, key, by_uid)
            for key, obj in live:
                if obj["metadata"].get("deletionTimestamp"):
                    progress |= self._collecting(self._finish_deletion, key)

    def _collecting(self, step: Any, key: tuple[Any, ...], *args: Any) -> bool:
        """One garbage-collection step on the current state of one object; a refused write is logged
        and left, as the real collector leaves what it cannot change (and retries it on the next pass)."""
        current = self._current(self._served_for_storage(key[0]), key[1], key[2])
        if current is None:
            return False  # gone earlier in this pass
        try:
            return bool(step(key, current, *args))
        except ApiError as e:
            logger.warning("Garbage collection could not handle %s %s/%s: %s", key[0].plural, key[1], key[2], e)
            return False

    def _collect_dependent(self, key: tuple[Any, ...], obj: dict[str, Any], by_uid: dict[str, Any]) -> bool:
        references = obj["metadata"].get("ownerReferences") or []
        if not references or obj["metadata"].get("deletionTimestamp"):
            return False
        owners = [by_uid.get(reference.get("uid")) for reference in references]
        served = self._served_for_storage(key[0])
        name, namespace = obj["metadata"]["name"], obj["metadata"].get("namespace")
        foreground = any(
            owner is not None
            and owner["metadata"].get("deletionTimestamp")
            and _FOREGROUND_FINALIZER in (owner["metadata"].get("finalizers") or [])
            for owner in owners
        )
        if all(owner is None for owner in owners) or foreground:
            self.delete(served, namespace, name, {"propagationPolicy": "Background"})
            return True
        if any(owner is None for owner in owners):
            remaining = [ref for ref, owner in zip(references, owners, strict=False) if owner is not None]
            self.update(served, namespace, name, {**obj, "metadata": {**obj["metadata"], "ownerReferences": remaining}})
            return True
        return False

    def _finish_deletion(self, key: tuple[Any, ...], obj: dict[str, Any]) -> bool:
        """Lift the server-owned finalizers once their work is done."""
        served = self._served_for_storage(key[0])
        metadata = obj["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        if served.storage == _NAMESPACES:
            return self._empty_namespace(metadata["name"])
        if _FOREGROUND_FINALIZER in finalizers and not self._has_dependents(metadata["uid"]):
            finalizers.remove(_FOREGROUND_FINALIZER)
        if _CRD_CLEANUP_FINALIZER in finalizers and self._remove_custom_resources(obj):
            finalizers.remove(_CRD_CLEANUP_FINALIZER)
            self._unregister_crd(obj["spec"]["group"], obj["spec"]["names"]["plural"])
        if finalizers == list(metadata.get("finalizers") or []):
            return False
        self.update(
            served,
            metadata.get("namespace"),
            metadata["name"],
            {**obj, "metadata": {**metadata, "finalizers": finalizers}},
        )
        return True

    def _empty_namespace(self, namespace: str) -> bool:
        progress = False
        remaining = False
        for key, obj in list(self._live()):
            if key[1] != namespace:
                continue
            remaining = True
            if not obj["metadata"].get("deletionTimestamp"):
                self.delete(self._served_for_storage(key[0]), namespace, key[2], {"gracePeriodSeconds": 0})
                progress = True
        if not remaining:
            served = self._served_of(_NAMESPACES)
            current = self._current(served, None, namespace)
            if current is not None and not current["metadata"].get("finalizers"):
                final = copy.deepcopy(current)
                final["metadata"]["resourceVersion"] = self._next_resource_version()
                self._commit(served, "DELETED", final, current)
                progress = True
        return progress

    def _namespace_is_empty(self, namespace: str) -> bool:
        return not any(key[1] == namespace for key, _ in self._live())

    def _remove_custom_resources(self, crd: Mapping[str, Any]) -> bool:
        """Delete the CRD's objects; True once none is left."""
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        leftovers = [(key, obj) for key, obj in self._live() if key[0].group == group and key[0].plural == plural]
        for key, obj in leftovers:
            if not obj["metadata"].get("deletionTimestamp"):
                self.delete(self._served_for_storage(key[0]), key[1], key[2])
        return not any(key[0].group == group and key[0].plural == plural for key, _ in self._live())

    def _has_dependents(self, uid: str) -> bool:
        return any(
            reference.get("uid") == uid
            for _, obj in self._live()
            for reference in obj["metadata"].get("ownerReferences") or []
        )

    def _orphan_dependents(self, uid: str) -> None:
        for key, obj in list(self._live()):
            references = obj["metadata"].get("ownerReferences") or []
            if any(reference.get("uid") == uid for reference in references):
                remaining = [reference for reference in references if reference.get("uid") != uid]
                self.update(
                    self._served_for_storage(key[0]),
                    key[1],
                    key[2],
                    {**obj, "metadata": {**obj["metadata"], "ownerReferences": remaining}},
                )

    def apply_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create the object or apply it over the existing one of that name (server-side apply)."""
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        served = next(
            (
                self._served_of(resource)
                for resource in self.resources
                if (resource.group, resource.version) == (group, version)
                and self.resources[resource].kind == obj.get("kind")
            ),
            None,
        )
        if served is None:
            raise ApiError(404, "NotFound", f"no resource of kind {obj.get('kind')} in {obj.get('apiVersion')}")
        metadata = obj.get("metadata") or {}
        namespace = (metadata.get("namespace") or "default") if served.namespaced else None
        if metadata.get("name") and self._current(served, namespace, metadata["name"]) is not None:
            updated, _, _ = self.patch(
                served, namespace, metadata["name"], kube_patches.APPLY_PATCH, dict(obj), field_manager="spotrag-box"
            )
            return updated
        created, _ = self.create(served, namespace, dict(obj))
        return created

    # --- subresources: scale, eviction, binding -------------------------------------------------

    def scale_of(self, served: Served, obj: Mapping[str, Any]) -> dict[str, Any]:
        paths = served.scale_paths()
        assert paths is not None
        spec_path, status_path, selector_path = paths
        if selector_path:
            selector = _get_path(obj, selector_path) or ""
        else:
            selector = kube_selectors.format_label_selector((obj.get("spec") or {}).get("selector") or {})
        metadata = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                key: metadata[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in metadata
            },
            "spec": {"replicas": _get_path(obj, spec_path) or 0},
            "status": {"replicas": _get_path(obj, status_path) or 0, "selector": selector},
        }

    def write_scale(self, served: Served, namespace: str | None, name: str, scale: Any) -> dict[str, Any]:
        if not isinstance(scale, Mapping) or not isinstance((scale.get("spec") or {}).get("replicas"), int):
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Required value',
                {
                    "name": name,
                    "group": "autoscaling",
                    "kind": "Scale",
                    "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.replicas"}],
                },
            )
        replicas = scale["spec"]["replicas"]
        if replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                f"{replicas}: must be greater than or equal to 0",
            )
        current = self._existing(served, namespace, name)
        expected_version = (scale.get("metadata") or {}).get("resourceVersion")
        if expected_version not in (None, "", current["metadata"]["resourceVersion"]):
            raise self._conflict(served, name)
        paths = served.scale_paths()
        assert paths is not None
        new = copy.deepcopy(current)
        _set_path(new, paths[0], replicas)
        updated, _ = self.update(served, namespace, name, new)
        return self.scale_of(served, updated)

    def evict(self, namespace: str, name: str, eviction: Any) -> None:
        """policy/v1 Eviction: refuse (429) what a PodDisruptionBudget forbids, else delete the pod."""
        pods = self._served_of(_PODS)
        pod = self._existing(pods, namespace, name)
        if not pod["metadata"].get("deletionTimestamp") and _is_ready(pod):
            for budget in self._select(self._served_of(_PDBS), namespace, (), ()):
                violation = self._budget_violation(budget, pod)
                if violation:
                    raise ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                        {"causes": [{"reason": "DisruptionBudget", "message": violation}]},
                    )
        options = (eviction or {}).get("deleteOptions") if isinstance(eviction, Mapping) else None
        self.delete(pods, namespace, name, options or {})

    def _budget_violation(self, budget: Mapping[str, Any], pod: Mapping[str, Any]) -> str | None:
        spec = budget.get("spec") or {}
        selector = kube_selectors.parse_label_selector(kube_selectors.format_label_selector(spec.get("selector") or {}))
        if not spec.get("selector") or not kube_selectors.labels_match(selector, pod):
            return None
        covered = [
            p
            for p in self._select(self._served_of(_PODS), budget["metadata"]["namespace"], selector, ())
            if not p["metadata"].get("deletionTimestamp")
        ]
        healthy = sum(1 for p in covered if _is_ready(p))
        expected = len(covered)

        def count(value: Any) -> int:
            if isinstance(value, str) and value.endswith("%"):
                return math.ceil(int(value[:-1]) * expected / 100)
            return int(value)

        if spec.get("minAvailable") is not None:
            desired = count(spec["minAvailable"])
        elif spec.get("maxUnavailable") is not None:
            desired = expected - count(spec["maxUnavailable"])
        else:
            return None
        if healthy - 1 >= desired:
            return None
        return f"The disruption budget {budget['metadata']['name']} needs {desired} healthy pods and has {healthy} currently"

    def bind(self, namespace: str, binding: Any, pod_name: str | None = None) -> None:
        """core/v1 Binding, as a scheduler posts it: set the pod's spec.nodeName once."""
        if not isinstance(binding, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a Binding object")
        name = pod_name or (binding.get("metadata") or {}).get("name")
        node = (binding.get("target") or {}).get("name")
        if not name or not node:
            raise ApiError(400, "BadRequest", "a Binding needs metadata.name and target.name")
        pods = self._served_of(_PODS)
        pod = self._existing(pods, namespace, name)
        if pod.get("spec", {}).get("nodeName"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{name}": '
                f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        new = copy.deepcopy(pod)
        new.setdefault("spec", {})["nodeName"] = node
        self.update(pods, namespace, name, new)

    # --- HTTP -------------------------------------------------------------------------------------

    def inject_faults(self, *, method: str, path_regex: str, status: int, times: int = 1) -> None:
        with self._faults_lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.times > 0 and fault.method in ("*", method) and fault.path_regex.search(path):
                    fault.times -= 1
                    return fault
        return None

    def recorded_requests(self, since: int = 0) -> list[RecordedRequest]:
        with self._log_lock:
            return [dataclasses.replace(request) for request in self._log if request.id > since]

    @property
    def request_count(self) -> int:
        return self._request_count

    def close_watches(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(_CLOSE)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body_bytes = await raw_request.read()
        content_type = raw_request.headers.get("Content-Type", "").split(";")[0].strip()
        with self._log_lock:
            self._request_count += 1
            record = RecordedRequest(
                id=self._request_count,
                method=raw_request.method,
                path=raw_request.path,
                query=dict(raw_request.query),
                body=_parse_body(body_bytes, content_type),
                content_type=content_type,
            )
            self._log.append(record)
        try:
            fault = self._take_fault(raw_request.method, raw_request.path)
            if fault is not None:
                raise ApiError(
                    fault.status,
                    _REASONS.get(fault.status, "InternalError"),
                    f"injected fault: {fault.status} for {raw_request.method} {raw_request.path}",
                    headers={"Retry-After": "1"} if fault.status == 429 else None,
                )
            if isinstance(record.body, _Unparsable):
                raise ApiError(
                    record.body.status,
                    _REASONS[record.body.status],
                    f"the request body is not valid {content_type or 'JSON'}: {record.body.error}",
                )
            response = await self._route(raw_request, record)
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)
        except Exception as e:  # a bug here must reach the client as a 500, as kube-apiserver would answer
            logger.exception("The Kubernetes API stand-in failed on %s %s", raw_request.method, raw_request.path)
            error = ApiError(500, "InternalError", f"Internal error occurred: {e!r}")
            response = aiohttp.web.json_response(error.status(), status=500)
        record.status = response.status
        return response

    async def _route(self, raw_request: aiohttp.web.BaseRequest, record: RecordedRequest) -> aiohttp.web.StreamResponse:
        path = raw_request.path.rstrip("/") or "/"
        method = raw_request.method
        if method == "GET":
            document = self._discovery(path)
            if document is not None:
                return aiohttp.web.json_response(document)
            if path in ("/healthz", "/livez", "/readyz"):
                return aiohttp.web.Response(text="ok")
            if path in ("/openapi/v2", "/openapi/v3"):
                return self._openapi(path, raw_request.headers.get("Accept", ""))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = self.lookup(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        served = self.lookup(group, version, rest[0])
        if served is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None and subresource not in served.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if served.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._dispatch(raw_request, record, served, namespace, name, subresource)

    async def _dispatch(
        self,
        raw_request: aiohttp.web.BaseRequest,
        record: RecordedRequest,
        served: Served,
        namespace: str | None,
        name: str | None,
        subresource: str | None,
    ) -> aiohttp.web.StreamResponse:
        method, params, body = raw_request.method, raw_request.query, record.body
        dry_run = params.get("dryRun") == "All"
        field_validation = params.get("fieldValidation", "Warn")
        accept = raw_request.headers.get("Accept")
        if method == "GET" and name is None:
            if _truthy(params.get("watch")):
                return await self._watch(raw_request, record, served, namespace)
            return aiohttp.web.json_response(self._list(served, namespace, params, accept))
        if method == "GET" and name is not None:
            obj = self._existing(served, namespace, name)
            if subresource == "scale":
                return aiohttp.web.json_response(self.scale_of(served, obj))
            if kube_tables.wants_table(accept):
                return aiohttp.web.json_response(self._table(served, [obj], params))
            return aiohttp.web.json_response(self._present(served, obj))
        if method == "POST" and name is None and served.plural == "bindings":
            assert namespace is not None
            self.bind(namespace, body)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "POST" and name is None:
            obj, warnings = self.create(served, namespace, body, dry_run=dry_run, field_validation=field_validation)
            return _json_response(self._present(served, obj), 201, warnings)
        if method == "POST" and subresource == "eviction":
            assert namespace is not None and name is not None
            self.evict(namespace, name, body)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "POST" and subresource == "binding":
            assert namespace is not None
            self.bind(namespace, body, pod_name=name)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "PUT" and name is not None:
            if subresource == "scale":
                return aiohttp.web.json_response(self.write_scale(served, namespace, name, body))
            obj, warnings = self.update(
                served,
                namespace,
                name,
                body,
                subresource=subresource,
                dry_run=dry_run,
                field_validation=field_validation,
            )
            return _json_response(self._present(served, obj), 200, warnings)
        if method == "PATCH" and name is not None:
            content_type = record.content_type
            if subresource == "scale":
                current_scale = self.scale_of(served, self._existing(served, namespace, name))
                try:
                    patched = kube_patches.apply_patch(content_type, current_scale, body, strategic=True)
                except kube_patches.PatchError as e:
                    raise ApiError(e.status, _REASONS.get(e.status, "Invalid"), str(e)) from e
                return aiohttp.web.json_response(self.write_scale(served, namespace, name, patched))
            obj, warnings, status = self.patch(
                served,
                namespace,
                name,
                content_type,
                body,
                subresource=subresource,
                dry_run=dry_run,
                field_validation=field_validation,
                field_manager=params.get("fieldManager"),
            )
            return _json_response(self._present(served, obj), status, warnings)
        if method == "DELETE":
            options = dict(body) if isinstance(body, Mapping) else {}
            if "propagationPolicy" in params:
                options["propagationPolicy"] = params["propagationPolicy"]
            if "orphanDependents" in params:
                options["orphanDependents"] = _truthy(params["orphanDependents"])
            if "gracePeriodSeconds" in params:
                options["gracePeriodSeconds"] = _integer(params, "gracePeriodSeconds")
            if name is not None:
                obj = self.delete(served, namespace, name, options, dry_run=dry_run)
                return aiohttp.web.json_response(self._present(served, obj))
            return aiohttp.web.json_response(self._delete_collection(served, namespace, params, options, dry_run))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _selectors(self, served: Served, params: Mapping[str, str]) -> tuple[Any, Any]:
        try:
            labels = kube_selectors.parse_label_selector(params.get("labelSelector"))
            selectable = frozenset(
                field["jsonPath"].lstrip(".")
                for field in (served.crd_version.get("selectableFields") or [] if served.crd else [])
            )
            fields = kube_selectors.parse_field_selector(
                params.get("fieldSelector"), kind=served.kind, extra_fields=selectable
            )
        except kube_selectors.SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from e
        return labels, fields

    def _list(
        self, served: Served, namespace: str | None, params: Mapping[str, str], accept: str | None
    ) -> dict[str, Any]:
        labels, fields = self._selectors(served, params)
        items = self._select(served, namespace, labels, fields)
        items, continue_token = _paginate(items, params)
        if kube_tables.wants_table(accept):
            return self._table(served, items, params, continue_token)
        metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if continue_token:
            metadata["continue"] = continue_token
        return {
            "kind": served.list_kind,
            "apiVersion": served.api_version,
            "metadata": metadata,
            "items": [self._present(served, obj) for obj in items],
        }

    def _delete_collection(
        self,
        served: Served,
        namespace: str | None,
        params: Mapping[str, str],
        options: Mapping[str, Any],
        dry_run: bool,
    ) -> dict[str, Any]:
        labels, fields = self._selectors(served, params)
        deleted = [
            self.delete(served, obj["metadata"].get("namespace"), obj["metadata"]["name"], options, dry_run=dry_run)
            for obj in self._select(served, namespace, labels, fields)
        ]
        return {
            "kind": served.list_kind,
            "apiVersion": served.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [self._present(served, obj) for obj in deleted],
        }

    def _table(
        self,
        served: Served,
        objects: list[dict[str, Any]],
        params: Mapping[str, str],
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        if served.crd is not None:
            columns = kube_tables.custom_resource_columns(served.crd_version)
        else:
            columns = kube_tables.BUILTIN_COLUMNS.get(served.kind, kube_tables.DEFAULT_COLUMNS)
        return kube_tables.build_table(
            [self._present(served, obj) for obj in objects],
            columns=columns,
            resource_version=str(self._rv),
            include_object=params.get("includeObject", "Metadata"),
            continue_token=continue_token,
        )

    def _present(self, served: Served, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as the requested version shows it (CRD versions convert with strategy None)."""
        if obj.get("apiVersion") == served.api_version:
            return obj
        return {**obj, "apiVersion": served.api_version}

    async def _watch(
        self, raw_request: aiohttp.web.BaseRequest, record: RecordedRequest, served: Served, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        params = raw_request.query
        labels, fields = self._selectors(served, params)
        try:
            timeout = float(params.get("timeoutSeconds") or 0)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid timeoutSeconds: {params['timeoutSeconds']!r}") from e
        timeout = timeout if timeout > 0 else DEFAULT_WATCH_TIMEOUT  # 0 means "the server's default"
        since = params.get("resourceVersion") or ""
        initial_events = _truthy(params.get("sendInitialEvents"))
        bookmarks = _truthy(params.get("allowWatchBookmarks"))
        as_table = kube_tables.wants_table(raw_request.headers.get("Accept"))
        watch = _Watch(served, namespace, labels, fields)

        # Snapshot and subscribe in one synchronous step: nothing can happen in between.
        backlog: list[tuple[str, Mapping[str, Any]]]
        if since in ("", "0") or initial_events:
            backlog = [("ADDED", obj) for obj in self._select(served, namespace, labels, fields)]
        else:
            if not since.isdigit():
                raise ApiError(400, "BadRequest", f"invalid resource version: {since!r}")
            if int(since) < self._oldest_resumable_rv:
                return await self._expired_watch(raw_request, record, since)
            backlog = [
                (event_type, change.obj)
                for change in self._changes
                if change.resource_version > int(since) and change.storage == served.storage
                for event_type in [watch.event_type(change)]
                if event_type is not None
            ]
        self._watches.add(watch)
        try:
            response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(raw_request)
            record.status = 200
            for event_type, obj in backlog:
                await response.write(self._event_line(served, event_type, obj, as_table, params))
            if initial_events:
                await response.write(self._bookmark_line(served, initial_events_end=True))
            deadline = asyncio.get_running_loop().time() + timeout
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                wait = min(remaining, self.bookmark_interval) if bookmarks else remaining
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout=wait)
                except TimeoutError:
                    if bookmarks and deadline - asyncio.get_running_loop().time() > 0:
                        await response.write(self._bookmark_line(served))
                    continue
                if item is _CLOSE:
                    break
                event_type, obj = item
                await response.write(self._event_line(served, event_type, obj, as_table, params))
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away; nothing to answer
        finally:
            self._watches.discard(watch)
        return response

    async def _expired_watch(
        self, raw_request: aiohttp.web.BaseRequest, record: RecordedRequest, since: str
    ) -> aiohttp.web.StreamResponse:
        """A watch from a resourceVersion we no longer remember: one ERROR event with 410, as etcd's compaction."""
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        record.status = 200
        error = ApiError(410, "Expired", f"too old resource version: {since} ({self._oldest_resumable_rv})")
        await response.write(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
        await response.write_eof()
        return response

    def _event_line(
        self, served: Served, event_type: str, obj: Mapping[str, Any], as_table: bool, params: Mapping[str, str]
    ) -> bytes:
        shown: Any = self._present(served, dict(obj))
        if as_table:
            shown = self._table(served, [dict(obj)], params)
        return json.dumps({"type": event_type, "object": shown}).encode() + b"\n"

    def _bookmark_line(self, served: Served, *, initial_events_end: bool = False) -> bytes:
        metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if initial_events_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        bookmark = {"kind": served.kind, "apiVersion": served.api_version, "metadata": metadata}
        return json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n"

    def _openapi(self, path: str, accept: str) -> aiohttp.web.Response:
        """OpenAPI documents that declare no schemas.

        With them, kubectl and helm validate client-side against nothing (they skip kinds
        the document lacks) instead of failing to download OpenAPI; custom resources are
        still validated here, by admission. kubectl asks /openapi/v2 for protobuf: an empty
        message is a valid, empty openapi_v2.Document.
        """
        if path == "/openapi/v3":
            return aiohttp.web.json_response({"paths": {}})
        if "protobuf" in accept:
            return aiohttp.web.Response(
                body=b"", content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
            )
        return aiohttp.web.json_response(
            {
                "swagger": "2.0",
                "info": {"title": "Kubernetes", "version": self.server_version},
                "paths": {},
                "definitions": {},
            }
        )

    # --- discovery ----------------------------------------------------------------------------------

    def _discovery(self, path: str) -> dict[str, Any] | None:
        parts = path.strip("/").split("/")
        if path == "/version":
            return self._version_info()
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._group_document(group) for group in sorted(self._groups())],
            }
        if parts[0] == "apis" and len(parts) == 2:
            if parts[1] not in self._groups():
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group_document(parts[1])}
        if (parts[0] == "api" and len(parts) == 2) or (parts[0] == "apis" and len(parts) == 3):
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            return self._resource_list(group, version)
        return None

    def _version_info(self) -> dict[str, Any]:
        match = re.match(r"v(\d+)\.(\d+)", self.server_version)
        major, minor = (match[1], match[2]) if match else ("1", "36")
        return {
            "major": major,
            "minor": minor,
            "emulationMajor": major,
            "emulationMinor": minor,
            "gitVersion": self.server_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for resource in self.resources:
            if resource.group:
                groups[resource.group].add(resource.version)
        return {group: sorted(versions, key=_version_priority, reverse=True) for group, versions in groups.items()}

    def _group_document(self, group: str) -> dict[str, Any]:
        versions = [{"groupVersion": f"{group}/{version}", "version": version} for version in self._groups()[group]]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for resource in sorted(self.resources, key=lambda r: r.plural):
            if (resource.group, resource.version) != (group, version):
                continue
            info = self.resources[resource]
            entries.append(
                {
                    "name": resource.plural,
                    "singularName": info.singular or "",
                    "kind": info.kind,
                    "namespaced": bool(info.namespaced),
                    "verbs": sorted(info.verbs),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {}),
                }
            )
            for subresource in sorted(set(info.subresources) & _SERVED_SUBRESOURCES):
                entries.append(
                    {
                        "name": f"{resource.plural}/{subresource}",
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        **_subresource_discovery(subresource, info.kind),
                    }
                )
        if not entries:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }


def _subresource_discovery(subresource: str, kind: str | None) -> dict[str, Any]:
    match subresource:
        case "scale":
            return {"kind": "Scale", "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]}
        case "eviction":
            return {"kind": "Eviction", "group": "policy", "version": "v1", "verbs": ["create"]}
        case "binding":
            return {"kind": "Binding", "verbs": ["create"]}
    return {"kind": kind, "verbs": ["get", "patch", "update"]}


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _success(code: int) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}


def _json_response(data: Any, status: int, warnings: list[str]) -> aiohttp.web.Response:
    headers = multidict.CIMultiDict[str]()
    for warning in warnings:
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return aiohttp.web.json_response(data, status=status, headers=headers)


@dataclasses.dataclass(frozen=True)
class _Unparsable:
    text: str
    error: str
    status: int = 400


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if content_type == kube_protobuf.CONTENT_TYPE:
        try:
            return kube_protobuf.decode(body)
        except kube_protobuf.ProtobufUnsupported as e:
            return _Unparsable(repr(body[:200]), str(e), 415)
    text = body.decode("utf-8", errors="replace")
    try:
        if content_type == kube_patches.APPLY_PATCH or content_type.endswith("yaml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        return _Unparsable(text, str(e))


def _integer(params: Mapping[str, str], name: str) -> int:
    try:
        return int(params.get(name) or 0)
    except ValueError as e:
        raise ApiError(400, "BadRequest", f"{name}: invalid integer {params[name]!r}") from e


def _paginate(items: list[dict[str, Any]], params: Mapping[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    """limit/continue: the token names the last item served; items are sorted by namespace/name."""
    start = 0
    if params.get("continue"):
        try:
            after = json.loads(base64.urlsafe_b64decode(params["continue"]))["after"]
        except (ValueError, KeyError) as e:
            raise ApiError(400, "BadRequest", f"invalid continue token: {params['continue']!r}") from e
        start = next(
            (
                i
                for i, obj in enumerate(items)
                if [obj["metadata"].get("namespace") or "", obj["metadata"]["name"]] > after
            ),
            len(items),
        )
    limit = _integer(params, "limit")
    if limit <= 0 or start + limit >= len(items):
        return items[start:], None
    page = items[start : start + limit]
    last = page[-1]["metadata"]
    token = base64.urlsafe_b64encode(json.dumps({"after": [last.get("namespace") or "", last["name"]]}).encode())
    return page, token.decode()
