"""Write semantics of the API stand-in: create, update (PUT), every PATCH type, server-side apply.

Server-set metadata (uid, creationTimestamp, generation, resourceVersion),
optimistic concurrency on resourceVersion, the status subresource split, and
no-op writes that change nothing. An update that lifts the last finalizer of a
deleted object ends its deletion (``deletion.py`` starts it).
"""

import copy
import random
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from spotrag_box.apiserver import crd_admission as admission
from spotrag_box.apiserver import patches as kube_patches
from spotrag_box.apiserver import validation
from spotrag_box.apiserver.errors import REASONS, ApiError, conflict, invalid, no_such_path, not_found
from spotrag_box.apiserver.registry import CRDS, NAMESPACES, Registry, Served
from spotrag_box.apiserver.store import Store

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apiserver's generateName alphabet
_SERVER_OWNED_ON_CREATE = ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields")
_IMMUTABLE_METADATA = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "namespace",
    "name",
)


class Writes:
    """Every change to an object goes through here (the HTTP layer, subresources and the collector)."""

    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry, self.store = registry, store
        self._cluster_ips: Iterator[str] = (f"10.96.{n // 254}.{n % 254 + 1}" for n in range(1, 65000))

    def existing(self, served: Served, namespace: str | None, name: str) -> dict[str, Any]:
        current = self.store.current(served, namespace, name)
        if current is None:
            raise not_found(served, name)
        return current

    def create(
        self, served: Served, namespace: str | None, body: Any, *, dry_run: bool = False, field_validation: str = "Warn"
    ) -> tuple[dict[str, Any], list[str]]:
        """Create an object as POST does; returns it and the warnings for the response."""
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(dict(body))
        validation.check_kind(served, obj)
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if served.namespaced:
            self._place_in_namespace(metadata, namespace)
        else:
            metadata.pop("namespace", None)
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise invalid(
                    served,
                    "",
                    [
                        admission.FieldError(
                            "metadata.name", "Required value: name or generateName is required", "FieldValueRequired"
                        )
                    ],
                )
            metadata["name"] = self._generated_name(served, namespace, metadata["generateName"])
        validation.check_name(served, metadata["name"])
        if self.store.current(served, namespace, metadata["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{served.qualified} "{metadata["name"]}" already exists',
                {"name": metadata["name"], "group": served.group, "kind": served.plural},
            )
        if "status" in served.subresources and served.kind != "Node":
            obj.pop("status", None)  # status is written through /status (kubelets register Nodes with it)
        obj, warnings = validation.admit(served, obj, None, field_validation)
        validation.set_builtin_defaults(served, obj, lambda: next(self._cluster_ips))
        validation.omit_empty_metadata(obj)
        metadata = obj["metadata"]
        for server_owned in _SERVER_OWNED_ON_CREATE:
            metadata.pop(server_owned, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = validation.now()
        metadata["generation"] = 1
        if dry_run:
            metadata["resourceVersion"] = str(self.store.resource_version)
            return obj, warnings
        metadata["resourceVersion"] = self.store.next_resource_version()
        self.store.commit(served, "ADDED", obj, None)
        if served.storage == CRDS:
            self.registry.register_crd(obj)
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
        current = self.existing(served, namespace, name)
        if not isinstance(proposed, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        new = copy.deepcopy(dict(proposed))
        validation.check_kind(served, new)
        metadata = new.setdefault("metadata", {})
        if metadata.get("name") not in (None, name):
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})",
            )
        if metadata.get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
            raise conflict(served, name)
        new = _with_status_of_subresource(served, new, current, subresource)
        metadata = new["metadata"]
        for immutable in _IMMUTABLE_METADATA:
            if immutable in current["metadata"]:
                metadata[immutable] = current["metadata"][immutable]
            else:
                metadata.pop(immutable, None)
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        _check_no_finalizer_added_while_deleting(served, name, new, current)
        new, warnings = validation.admit(served, new, current, field_validation)
        validation.omit_empty_metadata(new)
        without_status = "status" in served.subresources
        if _content(new, without_status=without_status) != _content(current, without_status=without_status):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if _without_resource_version(new) == _without_resource_version(current):
            return current, warnings  # a no-op write: no new resourceVersion, no watch event
        if dry_run:
            return new, warnings
        new["metadata"]["resourceVersion"] = self.store.next_resource_version()
        self.store.commit(served, "DELETED" if ready_to_go(self.store, served, new) else "MODIFIED", new, current)
        if served.storage == CRDS and not new["metadata"].get("deletionTimestamp"):
            self.registry.register_crd(new)
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
        _check_patch_type(served, content_type, field_manager)
        current = self.store.current(served, namespace, name)
        if current is None and content_type == kube_patches.APPLY_PATCH and subresource is None:
            if not isinstance(patch, Mapping):
                raise ApiError(400, "BadRequest", "the apply patch must be an object")
            created, warnings = self.create(
                served, namespace, patch, dry_run=dry_run, field_validation=field_validation
            )
            return created, warnings, 201
        current = self.existing(served, namespace, name)
        patched = apply_patch(content_type, current, patch, strategic=served.crd is None)
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

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create the object or apply it over the existing one of that name (server-side apply)."""
        served = self.registry.served_for_kind(str(obj.get("apiVersion", "")), obj.get("kind"))
        if served is None:
            raise ApiError(404, "NotFound", f"no resource of kind {obj.get('kind')} in {obj.get('apiVersion')}")
        metadata = obj.get("metadata") or {}
        namespace = (metadata.get("namespace") or "default") if served.namespaced else None
        if metadata.get("name") and self.store.current(served, namespace, metadata["name"]) is not None:
            updated, _, _ = self.patch(
                served, namespace, metadata["name"], kube_patches.APPLY_PATCH, dict(obj), field_manager="spotrag-box"
            )
            return updated
        created, _ = self.create(served, namespace, dict(obj))
        return created

    def _place_in_namespace(self, metadata: dict[str, Any], namespace: str | None) -> None:
        if namespace is None:
            raise no_such_path()
        if metadata.get("namespace") not in (None, "", namespace):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        metadata["namespace"] = namespace
        existing = self.store.current(self.registry.served(NAMESPACES), None, namespace)
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
            if self.store.current(served, namespace, name) is None:
                return name


def ready_to_go(store: Store, served: Served, obj: Mapping[str, Any]) -> bool:
    """Whether a deleted object can leave: no finalizers, no grace left, and (namespaces) no content."""
    metadata = obj["metadata"]
    ready = bool(
        metadata.get("deletionTimestamp")
        and not metadata.get("finalizers")
        and not metadata.get("deletionGracePeriodSeconds")
    )
    if ready and served.storage == NAMESPACES:
        return store.namespace_is_empty(metadata["name"])
    return ready


def apply_patch(content_type: str, current: Mapping[str, Any], patch: Any, *, strategic: bool) -> dict[str, Any]:
    try:
        return kube_patches.apply_patch(content_type, current, patch, strategic=strategic)
    except kube_patches.PatchError as e:
        raise ApiError(e.status, REASONS.get(e.status, "Invalid"), str(e)) from e


def _check_patch_type(served: Served, content_type: str, field_manager: str | None) -> None:
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


def _with_status_of_subresource(
    served: Served, new: dict[str, Any], current: dict[str, Any], subresource: str | None
) -> dict[str, Any]:
    """Through /status only status changes; elsewhere status is kept when it is a subresource."""
    if subresource == "status":
        new = {**copy.deepcopy(current), "status": new.get("status")}
        if new["status"] is None:
            del new["status"]
    elif "status" in served.subresources:
        new.pop("status", None)
        if "status" in current:
            new["status"] = copy.deepcopy(current["status"])
    return new


def _check_no_finalizer_added_while_deleting(
    served: Served, name: str, new: Mapping[str, Any], current: Mapping[str, Any]
) -> None:
    added = set(new["metadata"].get("finalizers") or []) - set(current["metadata"].get("finalizers") or [])
    if current["metadata"].get("deletionTimestamp") and added:
        raise invalid(
            served,
            name,
            [
                admission.FieldError(
                    "metadata.finalizers",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)}",
                    "FieldValueForbidden",
                )
            ],
        )


def _content(obj: Mapping[str, Any], *, without_status: bool) -> dict[str, Any]:
    """What a generation counts: everything but metadata (and status, when it is a subresource)."""
    skipped = {"metadata", "apiVersion", "kind"} | ({"status"} if without_status else set())
    return {key: value for key, value in obj.items() if key not in skipped}


def _without_resource_version(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": metadata}
