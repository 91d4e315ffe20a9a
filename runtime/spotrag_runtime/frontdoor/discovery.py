"""Keeps the front door's ``RouteTable`` current.

``KubeDiscovery`` watches RAGDeployments and ModelRoutes (in the configured
namespaces, or all) and, with ``address: endpointslices``, the EndpointSlices
of their gateway Services; every change rebuilds the table at once (a pure
function of what is held), and each ModelRoute's status is written when it
differs from what the object already says. ``StaticDiscovery`` serves a
fixed list of backends given by URL (no Kubernetes).

A new table replaces the old in one assignment: a request already sent keeps
its connection to the gateway it was sent to, so changing weights moves only
the requests that start afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from typing import Any

from spotrag_runtime.frontdoor.config import FrontDoorConfig, StaticBackend
from spotrag_runtime.frontdoor.kube import KubeClient, Watcher, collection_path
from spotrag_runtime.frontdoor.routing import GROUP, VERSION, Backend, RouteTable, build_table

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
STATIC_NAMESPACE = "static"


class Snapshot:
    """A route table and where each of its backends is reached, published
    together: a request reads one snapshot from start to end."""

    def __init__(self, table: RouteTable, urls: dict[str, list[str]]) -> None:
        self.table = table
        self._urls = urls
        self._turn: dict[str, itertools.count[int]] = {}

    def usable(self, backend: Backend) -> bool:
        return bool(self._urls.get(backend.key))

    def url(self, backend: Backend) -> str | None:
        """One URL of the backend's gateway (round robin over its endpoints)."""
        urls = self._urls.get(backend.key)
        if not urls:
            return None
        if len(urls) == 1:
            return urls[0]
        turn = self._turn.setdefault(backend.key, itertools.count())
        return urls[next(turn) % len(urls)]


class Directory:
    """The current snapshot, shared by the app and a discovery: the discovery
    replaces it (one assignment), requests read it."""

    def __init__(self) -> None:
        self.current = Snapshot(RouteTable(), {})
        self.synced = False

    @property
    def table(self) -> RouteTable:
        return self.current.table

    def publish(self, table: RouteTable, urls: dict[str, list[str]]) -> None:
        self.current = Snapshot(table, urls)
        self.synced = True


class StaticDiscovery:
    def __init__(self, config: FrontDoorConfig, directory: Directory) -> None:
        self.config = config
        self.directory = directory

    async def start(self) -> None:
        self.set_backends(self.config.static)

    async def close(self) -> None:
        pass

    def set_backends(self, backends: Iterable[StaticBackend]) -> None:
        """Replace the backends (tests change weights this way)."""
        ragds: dict[str, dict[str, Any]] = {}
        routes: dict[str, dict[str, Any]] = {}
        urls: dict[str, list[str]] = {}
        for item in backends:
            name = item.ragdeployment.rpartition("/")[2]
            spec: dict[str, Any] = {"model": {"servedModelName": item.served_model_name or item.model}}
            if item.moderation:
                spec["moderation"] = dict(item.moderation)
            ragds[name] = {"metadata": {"name": name, "namespace": STATIC_NAMESPACE}, "spec": spec}
            urls[f"{STATIC_NAMESPACE}/{name}"] = [item.url.rstrip("/")]
            route = routes.setdefault(
                item.model,
                {"metadata": {"name": item.model, "namespace": STATIC_NAMESPACE}, "spec": {"backends": []}},
            )
            route["spec"]["backends"].append({"ragDeployment": name, "weight": item.weight})
        table = build_table(ragds.values(), routes.values(), default_sticky_header=self.config.sticky_header)
        self.directory.publish(table, urls)


class KubeDiscovery:
    def __init__(self, config: FrontDoorConfig, directory: Directory, *, kubeconfig: str | None = None) -> None:
        self.config = config
        self.directory = directory
        self.kube = KubeClient(kubeconfig)
        namespaces: list[str | None] = list(config.namespaces) or [None]
        self._ragds = [self._watcher("ragdeployments", ns, GROUP) for ns in namespaces]
        self._routes = [self._watcher("modelroutes", ns, GROUP) for ns in namespaces]
        self._slices = (
            [self._watcher("endpointslices", ns, "discovery.k8s.io", version="v1", selector="") for ns in namespaces]
            if config.address == "endpointslices"
            else []
        )
        self._status_written: dict[tuple[str, str], dict[str, Any]] = {}
        self._status_wanted = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None

    def _watcher(
        self, plural: str, namespace: str | None, group: str, *, version: str = VERSION, selector: str | None = None
    ) -> Watcher:
        path = collection_path(group, version, plural, namespace)
        return Watcher(
            self.kube,
            path,
            on_change=self._rebuild,
            label_selector=self.config.selector if selector is None else selector,
        )

    @property
    def watchers(self) -> list[Watcher]:
        return [*self._ragds, *self._routes, *self._slices]

    @property
    def synced(self) -> bool:
        return all(w.synced.is_set() for w in self.watchers)

    async def start(self) -> None:
        await self.kube.start()
        for watcher in self.watchers:
            watcher.start()
        if self.config.write_status:
            self._status_task = asyncio.create_task(self._write_statuses(), name="spotrag-modelroute-status")

    async def wait_synced(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                for watcher in self.watchers:
                    await watcher.synced.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        tasks = [self._status_task] if self._status_task else []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watcher in self.watchers:
            await watcher.close()
        await self.kube.close()

    # --- rebuilding ---------------------------------------------------------

    def _rebuild(self) -> None:
        if not self.synced:
            return  # publish once every list is in, not a half-known table
        ragds = [obj for watcher in self._ragds for obj in watcher.items.values()]
        routes = [obj for watcher in self._routes for obj in watcher.items.values()]
        table = build_table(ragds, routes, default_sticky_header=self.config.sticky_header)
        self.directory.publish(table, self._urls(table))
        self._status_wanted.set()

    def _urls(self, table: RouteTable) -> dict[str, list[str]]:
        if self.config.address == "service":
            port = "" if self.config.gateway_port == 80 else f":{self.config.gateway_port}"
            return {
                key: [f"http://{b.name}.{b.namespace}.{self.config.cluster_domain}{port}"]
                for key, b in table.backends.items()
            }
        urls: dict[str, set[str]] = {}
        for watcher in self._slices:
            for endpoint_slice in watcher.items.values():
                meta = endpoint_slice.get("metadata") or {}
                service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
                key = f"{meta.get('namespace')}/{service}"
                if service and key in table.backends:
                    urls.setdefault(key, set()).update(_ready_urls(endpoint_slice))
        return {key: sorted(found) for key, found in urls.items()}

    # --- ModelRoute status ----------------------------------------------------

    async def _write_statuses(self) -> None:
        while True:
            await self._status_wanted.wait()
            self._status_wanted.clear()
            current = {tuple(key.split("/", 1)): obj for watcher in self._routes for key, obj in watcher.items.items()}
            for (namespace, name), status in self.directory.table.route_status.items():
                obj = current.get((namespace, name))
                if obj is None or _same_status(obj.get("status") or {}, status):
                    continue
                if self._status_written.get((namespace, name)) == status:
                    continue  # written already; the watch has not brought it back yet
                path = f"{collection_path(GROUP, VERSION, 'modelroutes', namespace)}/{name}"
                try:
                    await self.kube.patch_status(path, status)
                    self._status_written[(namespace, name)] = status
                except Exception as error:  # reported, retried on the next change
                    log.warning("cannot write the status of ModelRoute %s/%s: %r", namespace, name, error)


def _same_status(have: dict[str, Any], want: dict[str, Any]) -> bool:
    def strip(conditions: Any) -> list[Any]:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or ()]

    return all(have.get(k) == v for k, v in want.items() if k != "conditions") and strip(
        have.get("conditions")
    ) == strip(want.get("conditions"))


def _ready_urls(endpoint_slice: dict[str, Any]) -> set[str]:
    ports = [p for p in endpoint_slice.get("ports") or () if p.get("port")]
    named = [p for p in ports if p.get("name") == "http"]
    if not (named or ports):
        return set()
    port = (named or ports)[0]["port"]
    urls = set()
    for endpoint in endpoint_slice.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is not True or conditions.get("terminating") is True:
            continue
        addresses = endpoint.get("addresses") or []
        if addresses:
            host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
            urls.add(f"http://{host}:{port}")
    return urls
