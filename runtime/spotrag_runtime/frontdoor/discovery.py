"""Keeps the front door's ``RouteTable`` current.

``KubeDiscovery`` watches RAGDeployments and ModelRoutes (in the configured
namespaces, or all) and, with ``address: endpointslices``, the EndpointSlices
of their gateway Services, through the shared Kubernetes layer's informers
(``spotrag_runtime.kube``); every change rebuilds the table at once (a pure
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

import httpx

from spotrag_runtime.frontdoor.config import FrontDoorConfig, StaticBackend
from spotrag_runtime.frontdoor.routing import GROUP, VERSION, Backend, RouteTable, build_table
from spotrag_runtime.kube import AsyncKube, Informer, KubeError, collection_path, object_path

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
STATIC_NAMESPACE = "static"
API_VERSION = f"{GROUP}/{VERSION}"
# Without the ModelRoute CRD: how often to ask the API again whether it serves them.
MISSING_CRD_RECHECK_SECONDS = 30.0


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
    """Informers (the shared Kubernetes layer's list-then-watch caches) for
    RAGDeployments, ModelRoutes and, with ``address: endpointslices``,
    EndpointSlices, in each served namespace or in all."""

    def __init__(self, config: FrontDoorConfig, directory: Directory, *, kubeconfig: str | None = None) -> None:
        self.config = config
        self.directory = directory
        self._kubeconfig = kubeconfig
        self._client: AsyncKube | None = None
        self._namespaces: list[str | None] = list(config.namespaces) or [None]
        self._ragds: list[Informer] = []
        self._routes: list[Informer] = []
        self._slices: list[Informer] = []
        self._routes_checked = False  # the API was asked whether it serves ModelRoutes
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuild_scheduled = False
        self._status_written: dict[tuple[str, str], dict[str, Any]] = {}
        self._status_wanted = asyncio.Event()

    @property
    def informers(self) -> list[Informer]:
        return [*self._ragds, *self._routes, *self._slices]

    @property
    def synced(self) -> bool:
        return self._routes_checked and all(informer.synced.is_set() for informer in self.informers)

    async def start(self) -> None:
        self._client = await asyncio.to_thread(AsyncKube.from_kubeconfig, self._kubeconfig)
        selector = self.config.selector or None
        self._ragds = [self._informer(API_VERSION, "ragdeployments", ns, selector) for ns in self._namespaces]
        if self.config.address == "endpointslices":
            self._slices = [self._informer("discovery.k8s.io/v1", "endpointslices", ns) for ns in self._namespaces]
        self._tasks.append(asyncio.create_task(self._watch_routes(selector), name="spotrag-modelroutes"))
        if self.config.write_status:
            self._tasks.append(asyncio.create_task(self._write_statuses(), name="spotrag-modelroute-status"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def _informer(self, api_version: str, plural: str, namespace: str | None, selector: str | None = None) -> Informer:
        assert self._client is not None
        informer = Informer(
            self._client,
            collection_path(api_version, plural, namespace),
            label_selector=selector,
            name=f"{plural} in {namespace or 'every namespace'}",
        )
        informer.subscribe(lambda _kind, _obj: self._rebuild_soon())
        self._tasks.append(asyncio.create_task(informer.run(), name=f"spotrag-{plural}-{namespace or 'all'}"))
        self._tasks.append(asyncio.create_task(self._rebuild_when_synced(informer)))
        return informer

    async def _rebuild_when_synced(self, informer: Informer) -> None:
        # An empty list notifies no listener, yet it completes what is known.
        await informer.synced.wait()
        self._rebuild_soon()

    async def _watch_routes(self, selector: str | None) -> None:
        """ModelRoutes, once the API serves them: without the CRD, RAGDeployments
        are still served (and the API is asked again now and then)."""
        while not await self._serves_modelroutes():
            if not self._routes_checked:
                log.warning("the API serves no ModelRoutes (is their CRD installed?): serving RAGDeployments only")
                self._routes_checked = True
                self._rebuild_soon()
            await asyncio.sleep(MISSING_CRD_RECHECK_SECONDS)
        self._routes = [self._informer(API_VERSION, "modelroutes", ns, selector) for ns in self._namespaces]
        self._routes_checked = True

    async def _serves_modelroutes(self) -> bool:
        assert self._client is not None
        try:
            group = await self._client.get(f"/apis/{API_VERSION}")
        except (KubeError, httpx.HTTPError) as error:
            log.warning("cannot ask the API which spotrag.io resources it serves: %r", error)
            return False
        return any(resource.get("name") == "modelroutes" for resource in (group or {}).get("resources") or ())

    # --- rebuilding ---------------------------------------------------------

    def _rebuild_soon(self) -> None:
        """Rebuild once for a burst of events (a list notifies once per object)."""
        if not self._rebuild_scheduled:
            self._rebuild_scheduled = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_scheduled = False
        if not self.synced:
            return  # publish once every list is in, not a half-known table
        ragds = [obj for informer in self._ragds for obj in informer.items()]
        routes = [obj for informer in self._routes for obj in informer.items()]
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
        for informer in self._slices:
            for endpoint_slice in informer.items():
                meta = endpoint_slice.get("metadata") or {}
                service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
                key = f"{meta.get('namespace')}/{service}"
                if service and key in table.backends:
                    urls.setdefault(key, set()).update(_ready_urls(endpoint_slice))
        return {key: sorted(found) for key, found in urls.items()}

    # --- ModelRoute status ----------------------------------------------------

    async def _write_statuses(self) -> None:
        assert self._client is not None
        while True:
            await self._status_wanted.wait()
            self._status_wanted.clear()
            for (namespace, name), status in self.directory.table.route_status.items():
                obj = next((i.get(namespace, name) for i in self._routes if i.get(namespace, name)), None)
                if obj is None or _same_status(obj.get("status") or {}, status):
                    continue
                if self._status_written.get((namespace, name)) == status:
                    continue  # written already; the watch has not brought it back yet
                path = object_path(API_VERSION, "modelroutes", name, namespace, "status")
                try:
                    await self._client.patch(path, {"status": status})
                    self._status_written[(namespace, name)] = status
                except (KubeError, httpx.HTTPError) as error:  # reported, retried on the next change
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
