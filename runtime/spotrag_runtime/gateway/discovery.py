"""Which engines serve: a static list, or the EndpointSlices of the engines'
headless Service, watched through the Kubernetes API.

The operator's engine Service selects only pods labelled
``spotrag.io/serving=true``, so an engine being drained leaves its
EndpointSlice at once; only endpoints whose ``conditions.ready`` is true
count. Each watch event updates the admission controller's serving set, so
an engine that leaves gets no new request from the moment the event arrives
(milliseconds after the label flips).

The watch is plain HTTP (list, then watch from its resourceVersion, with
bookmarks; a 410 or a dropped connection re-lists), on the same async client
library as the engines, so it stops cleanly with the gateway. Credentials and
the server come from the ``kubernetes`` package's loaders: in-cluster
service-account config (with token refresh) or a kubeconfig file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import httpx

from spotrag_runtime.gateway.config import EnginesConfig
from spotrag_runtime.kubeconfig import httpx_options, load_configuration

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_SECONDS = 240  # the server ends each watch after this; we re-watch from where it stopped
RETRY_MIN_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0


class Discovery(Protocol):
    @property
    def synced(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticDiscovery:
    """A fixed list of engine URLs (out of a cluster, or for tests)."""

    def __init__(self, urls: Iterable[str], on_change: Callable[[list[str]], None]) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self._on_change = on_change

    @property
    def synced(self) -> bool:
        return True

    async def start(self) -> None:
        self._on_change(self.urls)

    async def close(self) -> None:
        pass


def _kube_connection(kubeconfig: str | None) -> tuple[Any, dict[str, Any]]:
    """The kubernetes package's Configuration and the httpx options it implies."""
    configuration = load_configuration(kubeconfig)
    return configuration, httpx_options(configuration)


def _engine_urls(slices: Iterable[dict[str, Any]], config: EnginesConfig) -> list[str]:
    urls = set()
    for endpoint_slice in slices:
        ports = [p for p in endpoint_slice.get("ports") or () if p.get("port")]
        named = [p for p in ports if p.get("name") == "http"]
        port = (named or ports or [{"port": config.port}])[0]["port"]
        for endpoint in endpoint_slice.get("endpoints") or ():
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not True or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:  # every address of an endpoint is the same pod
                host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
                urls.add(f"{config.scheme}://{host}:{port}")
    return sorted(urls)


class EndpointSliceDiscovery:
    def __init__(
        self,
        config: EnginesConfig,
        *,
        namespace: str,
        on_change: Callable[[list[str]], None],
        kubeconfig: str | None = None,
    ) -> None:
        assert config.service, "engines.service is required for EndpointSlice discovery"
        self.config = config
        self.service = config.service
        self.namespace = config.namespace or namespace
        self._on_change = on_change
        self._kubeconfig = kubeconfig
        self._slices: dict[str, dict[str, Any]] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._kube: Any = None

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def start(self) -> None:
        self._kube, options = await asyncio.to_thread(_kube_connection, self._kubeconfig)
        timeout = httpx.Timeout(10.0, read=WATCH_SECONDS + 30)
        self._http = httpx.AsyncClient(base_url=self._kube.host, timeout=timeout, **options)
        self._task = asyncio.create_task(self._run(), name=f"spotrag-endpointslices-{self.service}")

    async def wait_synced(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http:
            await self._http.aclose()

    # --- the list + watch loop -------------------------------------------------

    @property
    def _path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"

    def _headers(self) -> dict[str, str]:
        # Read per request: in-cluster tokens are rotated and refreshed by the hook.
        auth = self._kube.auth_settings().get("BearerToken")
        return {"Authorization": auth["value"]} if auth and auth.get("value") else {}

    def _mine(self, endpoint_slice: dict[str, Any]) -> bool:
        # Filter here too: not every API server honours the label selector.
        labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
        return labels.get(SERVICE_NAME_LABEL) == self.service

    async def _run(self) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                version = await self._list()
                delay = RETRY_MIN_SECONDS
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "EndpointSlice watch of %s/%s failed: %r; retrying in %.1fs",
                    self.namespace,
                    self.service,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _list(self) -> str:
        assert self._http is not None
        response = await self._http.get(
            self._path, params={"labelSelector": f"{SERVICE_NAME_LABEL}={self.service}"}, headers=self._headers()
        )
        response.raise_for_status()
        listing = response.json()
        self._slices = {item["metadata"]["name"]: item for item in listing.get("items") or () if self._mine(item)}
        self._publish()
        self._synced.set()
        return (listing.get("metadata") or {}).get("resourceVersion") or ""

    async def _watch(self, version: str) -> str | None:
        """Follow changes from ``version``; the version to go on from, or None to re-list."""
        assert self._http is not None
        params = {
            "labelSelector": f"{SERVICE_NAME_LABEL}={self.service}",
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        if version:
            params["resourceVersion"] = version
        async with self._http.stream("GET", self._path, params=params, headers=self._headers()) as response:
            if response.status_code == 410:
                return None
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    log.info("EndpointSlice watch ended by the server: %s", item.get("message"))
                    return None  # 410 Gone and friends: start again from a fresh list
                metadata = item.get("metadata") or {}
                version = metadata.get("resourceVersion") or version
                if kind == "BOOKMARK" or not self._mine(item):
                    continue
                if kind == "DELETED":
                    self._slices.pop(metadata.get("name"), None)
                else:
                    self._slices[metadata.get("name")] = item
                self._publish()
        return version

    def _publish(self) -> None:
        urls = _engine_urls(self._slices.values(), self.config)
        log.debug("engines of %s/%s: %s", self.namespace, self.service, urls)
        self._on_change(urls)
