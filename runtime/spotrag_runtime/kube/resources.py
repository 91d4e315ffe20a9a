"""Resource paths and the small helpers every client shares."""

from __future__ import annotations

from dataclasses import dataclass


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


# Every kind spotrag reads or writes by (apiVersion, kind).
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
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): Resource("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
}


def resource_for(api_version: str, kind: str) -> Resource:
    try:
        return RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"spotrag does not manage {kind} ({api_version})") from None


def collection_path(api_version: str, plural: str, namespace: str | None = None) -> str:
    return Resource(api_version, plural).path(namespace)


def object_path(
    api_version: str, plural: str, name: str, namespace: str | None = None, subresource: str | None = None
) -> str:
    return Resource(api_version, plural).path(namespace, name, subresource)


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def object_key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def owner_reference(owner: dict, *, controller: bool = True) -> dict:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }
