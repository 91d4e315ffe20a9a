"""The EndpointSlice controller: for each Service with a selector, the pods
it selects that have an IP, as discovery.k8s.io/v1 EndpointSlices with the
conditions the real controller sets:

- ready: the pod is Ready and not terminating (always true with
  publishNotReadyAddresses);
- serving: the pod is Ready, terminating or not;
- terminating: the pod has a deletionTimestamp.

Not-ready pods are listed with ready=false, as the real controller lists
them; consumers (the gateway, kube-proxy) route to ready endpoints only.

One slice per pod (a real controller packs up to 100 endpoints in a slice;
consumers see the same endpoints either way).
"""

from __future__ import annotations

import hashlib
import logging

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

from .controller import Controller

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"


def pod_is_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def resolve_port(pod: dict, target: int | str) -> int | None:
    """The pod's port for a service's targetPort (a number, or a port name)."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return port["containerPort"]
    return None


def slice_name(service: str, pod: dict) -> str:
    digest = hashlib.sha256(pod["metadata"]["uid"].encode()).hexdigest()[:5]
    return f"{service[:57]}-{digest}"


def desired_slice(service: dict, pod: dict, node_zones: dict[str, str]) -> dict | None:
    meta, spec = service["metadata"], service["spec"]
    pod_ip = (pod.get("status") or {}).get("podIP")
    if not pod_ip or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    ports = []
    for port in spec.get("ports") or []:
        resolved = resolve_port(pod, port.get("targetPort", port["port"]))
        if resolved is not None:
            ports.append({"name": port.get("name", ""), "port": resolved, "protocol": port.get("protocol", "TCP")})
    terminating = bool(pod["metadata"].get("deletionTimestamp"))
    ready = pod_is_ready(pod)
    node = pod["spec"].get("nodeName")
    endpoint = {
        "addresses": [pod_ip],
        "conditions": {
            "ready": spec.get("publishNotReadyAddresses", False) or (ready and not terminating),
            "serving": ready,
            "terminating": terminating,
        },
        "targetRef": {
            "kind": "Pod",
            "namespace": pod["metadata"]["namespace"],
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        },
    }
    if node:
        endpoint["nodeName"] = node
        if zone := node_zones.get(node):
            endpoint["zone"] = zone
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(meta["name"], pod),
            "namespace": meta["namespace"],
            "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": [endpoint],
        "ports": ports,
    }


class EndpointSliceController(Controller):
    name = "endpointslice-controller"

    def __init__(
        self,
        client: AsyncKube,
        services: Informer,
        pods: Informer,
        slices: Informer,
        nodes: Informer,
        *,
        resync: float,
    ):
        super().__init__(resync=resync)
        self.client = client
        self.services = services
        self.pods = pods
        self.slices = slices
        self.nodes = nodes
        for informer in (services, pods, slices):
            informer.subscribe(self.wake)

    async def reconcile(self) -> None:
        if not all(i.synced.is_set() for i in (self.services, self.pods, self.slices, self.nodes)):
            return
        zones = {
            n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get("topology.kubernetes.io/zone", "")
            for n in self.nodes.items()
        }
        desired: dict[tuple[str, str], dict] = {}
        services = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in self.services.items()}
        for service in self.services.items():
            selector = (service.get("spec") or {}).get("selector")
            if not selector:
                continue  # Services without a selector have slices written by someone else
            namespace = service["metadata"]["namespace"]
            for pod in self.pods.items():
                if pod["metadata"]["namespace"] != namespace or not selects(
                    selector, pod["metadata"].get("labels") or {}
                ):
                    continue
                if (wanted := desired_slice(service, pod, zones)) is not None:
                    desired[(namespace, wanted["metadata"]["name"])] = wanted

        for key, existing in list(self.slices.cache.items()):
            labels = existing["metadata"].get("labels") or {}
            if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
                continue
            if key not in desired or (key[0], labels.get(SERVICE_NAME_LABEL, "")) not in services:
                await self._delete(existing)
        for key, wanted in desired.items():
            existing = self.slices.cache.get(key)
            if existing is None:
                await self._create(wanted)
            elif (
                any(existing.get(f) != wanted[f] for f in ("endpoints", "ports"))
                or existing["metadata"].get("labels") != wanted["metadata"]["labels"]
            ):
                await self._update(wanted)

    async def _create(self, wanted: dict) -> None:
        namespace = wanted["metadata"]["namespace"]
        try:
            await self.client.create(collection_path("discovery.k8s.io/v1", "endpointslices", namespace), wanted)
        except KubeError as error:
            if error.status != 409:
                raise
            await self._update(wanted)

    async def _update(self, wanted: dict) -> None:
        meta = wanted["metadata"]
        patch = {"metadata": {"labels": meta["labels"]}, "endpoints": wanted["endpoints"], "ports": wanted["ports"]}
        try:
            await self.client.patch(
                object_path("discovery.k8s.io/v1", "endpointslices", meta["name"], meta["namespace"]), patch
            )
        except KubeError as error:
            if error.status != 404:
                raise

    async def _delete(self, existing: dict) -> None:
        meta = existing["metadata"]
        await self.client.delete(object_path("discovery.k8s.io/v1", "endpointslices", meta["name"], meta["namespace"]))
