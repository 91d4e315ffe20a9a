"""Which resources the API stand-in serves: the built-in ones, kopf's peerings, and those of applied CRDs.

The built-in resources are the discovery documents (``APIResourceList``) of a
plain Kubernetes API server, kept in ``builtin_resources.json`` (taken from
kmock 0.8's bundled K3s dump, MIT, without the add-on groups metrics.k8s.io and
gateway.networking.k8s.io and without the review APIs authentication.k8s.io and
authorization.k8s.io, which a store cannot answer truthfully).
"""

import dataclasses
import importlib.resources
import json
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

SERVED_SUBRESOURCES = frozenset({"status", "scale", "eviction", "binding"})
CRD_VERBS = frozenset({"delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"})

# kopf's peering resources, served as if their CRDs were installed (kopf.dev/v1).
KOPF_PEERINGS = {
    "clusterkopfpeerings": ("ClusterKopfPeering", False),
    "kopfpeerings": ("KopfPeering", True),
}


class ResourceKey(NamedTuple):
    """A resource as a URL names it; an object is stored under its resource's storage version."""

    group: str
    version: str
    plural: str


CRDS = ResourceKey("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = ResourceKey("", "v1", "namespaces")
PODS = ResourceKey("", "v1", "pods")
PDBS = ResourceKey("policy", "v1", "poddisruptionbudgets")


@dataclasses.dataclass(frozen=True)
class ResourceInfo:
    """What discovery says of one resource."""

    kind: str
    namespaced: bool
    verbs: frozenset[str]
    singular: str = ""
    shortnames: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    subresources: frozenset[str] = frozenset()


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
    def storage(self) -> ResourceKey:
        return ResourceKey(self.group, self.storage_version, self.plural)

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


class Registry:
    """The served resources, in the order they were registered."""

    def __init__(self) -> None:
        self._resources: dict[ResourceKey, ResourceInfo] = {}
        self._crds: dict[tuple[str, str], dict[str, Any]] = {}
        text = importlib.resources.files(__package__).joinpath("builtin_resources.json").read_text()
        for document in json.loads(text):
            self._resources.update(_parse_resource_list(document))
        for plural, (kind, namespaced) in KOPF_PEERINGS.items():
            self._resources[ResourceKey("kopf.dev", "v1", plural)] = ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=CRD_VERBS
            )

    def __iter__(self) -> Iterator[tuple[ResourceKey, ResourceInfo]]:
        yield from list(self._resources.items())

    def lookup(self, group: str, version: str, plural: str) -> Served | None:
        resource = ResourceKey(group, version, plural)
        return self.served(resource) if resource in self._resources else None

    def served(self, resource: ResourceKey) -> Served:
        info = self._resources[resource]
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
            namespaced=info.namespaced,
            subresources=info.subresources & SERVED_SUBRESOURCES,
            list_kind=list_kind,
            storage_version=storage_version,
            crd=crd,
        )

    def served_for_storage(self, storage: ResourceKey) -> Served:
        """The resource a stored object is served as (its storage version, or any served one)."""
        if storage in self._resources:
            return self.served(storage)
        for resource in self._resources:
            if (resource.group, resource.plural) == (storage.group, storage.plural):
                return self.served(resource)
        raise LookupError(f"{storage.plural}.{storage.group} is no longer served")

    def served_for_kind(self, api_version: str, kind: str | None) -> Served | None:
        group, _, version = api_version.rpartition("/")
        for resource, info in self._resources.items():
            if (resource.group, resource.version) == (group, version) and info.kind == kind:
                return self.served(resource)
        return None

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        self.unregister_crd(spec["group"], names["plural"])
        self._crds[(spec["group"], names["plural"])] = dict(crd)
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = frozenset((version.get("subresources") or {}).keys()) & {"status", "scale"}
            self._resources[ResourceKey(spec["group"], version["name"], names["plural"])] = ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs=CRD_VERBS,
                shortnames=frozenset(names.get("shortNames") or []),
                categories=frozenset(names.get("categories") or []),
                subresources=subresources,
            )

    def unregister_crd(self, group: str, plural: str) -> None:
        self._crds.pop((group, plural), None)
        for resource in [r for r in self._resources if r.group == group and r.plural == plural]:
            del self._resources[resource]


def _parse_resource_list(document: Mapping[str, Any]) -> dict[ResourceKey, ResourceInfo]:
    """One discovery document: its resources, with the subresources ('pods/status') folded in."""
    group, _, version = document["groupVersion"].rpartition("/")
    entries = document["resources"]
    subresources: dict[str, set[str]] = {}
    for entry in entries:
        parent, slash, subresource = entry["name"].partition("/")
        if slash:
            subresources.setdefault(parent, set()).add(subresource)
    return {
        ResourceKey(group, version, entry["name"]): ResourceInfo(
            kind=entry["kind"],
            namespaced=bool(entry["namespaced"]),
            verbs=frozenset(entry["verbs"]),
            singular=entry.get("singularName") or "",
            shortnames=frozenset(entry.get("shortNames") or []),
            categories=frozenset(entry.get("categories") or []),
            subresources=frozenset(subresources.get(entry["name"], ())),
        )
        for entry in entries
        if "/" not in entry["name"]
    }
