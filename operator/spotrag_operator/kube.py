"""A small, generic client for the Kubernetes objects the operator manages.

It rides on the official `kubernetes` client's ApiClient (so kubeconfig,
in-cluster config, exec credential plugins and token refresh all work as in
any other tool) but speaks in plain dicts and resource paths: the operator
renders plain manifests, and one path table is less code than a typed API
per kind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import kubernetes

from spotrag_runtime.kubeconfig import load_configuration

logger = logging.getLogger(__name__)

FIELD_MANAGER = "spotrag-operator"


@dataclass(frozen=True)
class Resource:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


# Every kind the operator reads or writes, keyed by (apiVersion, kind).
RESOURCES: dict[tuple[str, str], Resource] = {
    ("v1", "Pod"): Resource("v1", "pods"),
    ("v1", "Service"): Resource("v1", "services"),
    ("v1", "ConfigMap"): Resource("v1", "configmaps"),
    ("v1", "Secret"): Resource("v1", "secrets"),
    ("v1", "ServiceAccount"): Resource("v1", "serviceaccounts"),
    ("v1", "PersistentVolumeClaim"): Resource("v1", "persistentvolumeclaims"),
    ("v1", "Node"): Resource("v1", "nodes", namespaced=False),
    ("apps/v1", "Deployment"): Resource("apps/v1", "deployments"),
    ("batch/v1", "Job"): Resource("batch/v1", "jobs"),
    ("policy/v1", "PodDisruptionBudget"): Resource("policy/v1", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io/v1", "Role"): Resource("rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Resource("rbac.authorization.k8s.io/v1", "rolebindings"),
    ("discovery.k8s.io/v1", "EndpointSlice"): Resource("discovery.k8s.io/v1", "endpointslices"),
    ("spotrag.io/v1alpha1", "RAGDeployment"): Resource("spotrag.io/v1alpha1", "ragdeployments"),
}


VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class KubeError(Exception):
    """An error answer from the Kubernetes API, with its status and reason."""

    def __init__(
        self, status: int, reason: str, message: str, body: dict | None = None, *, method: str = "", path: str = ""
    ):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        self.method = method
        self.path = path

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    def request(self) -> str:
        """The request in RBAC's words, e.g. "create pods in namespace default"."""
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        group = "" if parts[:1] == ["api"] else parts[1] if len(parts) > 1 else ""
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        resource = rest[0] if rest else "?"
        if len(rest) > 2:
            resource += f"/{rest[2]}"  # a subresource, e.g. ragdeployments/status
        verb = VERBS.get(self.method, self.method.lower())
        if verb == "get" and len(rest) == 1:
            verb = "list"
        where = f" in namespace {namespace}" if namespace else ""
        return f"{verb} {resource}{f' ({group})' if group else ''}{where}"

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def resource_for(api_version: str, kind: str) -> Resource:
    try:
        return RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None


def load_api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """In-cluster config when running in a pod, else the kubeconfig (or $KUBECONFIG)."""
    return kubernetes.client.ApiClient(load_configuration(kubeconfig))


class Kube:
    """CRUD on plain dict manifests; errors raise KubeError."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict:
        method, url, headers, body, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(method, url, header_params=headers, body=body)
        data = response.read()
        payload: dict = json.loads(data) if data else {}
        if not 200 <= response.status < 300:
            raise KubeError(
                response.status,
                payload.get("reason", "") if isinstance(payload, dict) else "",
                payload.get("message", data.decode(errors="replace")) if isinstance(payload, dict) else str(payload),
                payload if isinstance(payload, dict) else None,
                method=method,
                path=path,
            )
        return payload

    # Reads ---------------------------------------------------------------

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self._call("GET", resource_for(api_version, kind).path(namespace, name))
        except KubeError as error:
            if error.not_found:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict]:
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        result = self._call("GET", resource_for(api_version, kind).path(namespace), query=query)
        return result.get("items") or []

    # Writes --------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        resource = resource_for(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace")
        return self._call("POST", resource.path(namespace), body=obj, query={"fieldManager": FIELD_MANAGER})

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: dict,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> dict:
        return self._call(
            "PATCH",
            resource_for(api_version, kind).path(namespace, name, subresource),
            body=patch,
            query={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete; False if it was already gone (deletes are idempotent)."""
        try:
            self._call(
                "DELETE",
                resource_for(api_version, kind).path(namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
            return True
        except KubeError as error:
            if error.not_found:
                return False
            raise

    def ensure(self, desired: dict) -> str:
        """Create `desired`, or merge-patch the live object where it differs.

        Returns "created", "updated" or "unchanged". Only the fields we render
        are compared, so defaults a server adds never cause a write; running
        it twice changes nothing.
        """
        meta = desired["metadata"]
        live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta.get("namespace"))
        if live is None:
            try:
                self.create(desired)
                return "created"
            except KubeError as error:
                if not error.conflict:
                    raise
                # Someone (a previous run of ours) created it meanwhile: compare instead.
                live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta.get("namespace"))
                if live is None:
                    raise
        patch = merge_difference(desired, live) or {}
        patch.pop("status", None)
        if not patch:
            return "unchanged"
        self.patch(desired["apiVersion"], desired["kind"], meta["name"], patch, meta.get("namespace"))
        return "updated"


def merge_difference(desired: Any, live: Any) -> Any:
    """The merge patch that makes `live` carry every field of `desired`.

    Dicts are compared key by key; anything else (lists included, as merge
    patch replaces lists whole) is replaced when it differs. Fields of `live`
    that `desired` does not mention are left alone.
    """
    if isinstance(desired, dict) and isinstance(live, dict):
        patch = {}
        for key, value in desired.items():
            if key not in live:
                patch[key] = value
                continue
            sub = merge_difference(value, live[key])
            if sub is not _SAME:
                patch[key] = sub
        return patch if patch else _SAME
    return _SAME if _normalize(desired) == _normalize(live) else desired


class _Same:
    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<same>"


_SAME: Any = _Same()


def _normalize(value: Any) -> Any:
    # Compare numbers the way JSON sees them (a server may send 1.0 for 1).
    return json.loads(json.dumps(value))


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def owner_reference(owner: dict, *, controller: bool = True) -> dict:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def names(objs: Iterable[dict]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)
