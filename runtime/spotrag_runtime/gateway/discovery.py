"""Which engines serve: a static list, or the EndpointSlices of the engines'
headless Service, watched through the Kubernetes API.

The operator's engine Service selects only pods labelled
``spotrag.io/serving=true``, so an engine being drained leaves its
EndpointSlice at once; only endpoints whose ``conditions.ready`` is true
count. Each watch event updates the admission controller's serving set, so
an engine that leaves gets no new request from the moment the event arrives
(milliseconds after the label flips).

The watch is spotrag's one list-then-watch loop (``spotrag_runtime.kube``:
plain HTTP, bookmarks, a 410 or a dropped connection re-lists, with backoff),
on the same async client library as the engines, so it stops cleanly with the
gateway. Credentials and the server come from the ``kubernetes`` package's
loaders: in-cluster service-account config (with token refresh) or a
kubeconfig file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from spotrag_runtime.gateway.config import EnginesConfig
from spotrag_runtime.kube import AsyncKube, collection_path, list_watch, load_configuration

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_SECONDS = 240  # the server ends each watch after this; we re-watch from where it stopped
BACKOFF_SECONDS = (0.5, 10.0)  # first retry, longest wait


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
        self._kube: AsyncKube | None = None

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def start(self) -> None:
        configuration = await asyncio.to_thread(load_configuration, self._kubeconfig)
        self._kube = AsyncKube(configuration, watch_seconds=WATCH_SECONDS)
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
        if self._kube:
            await self._kube.close()

    # --- the list + watch loop -------------------------------------------------

    def _mine(self, endpoint_slice: dict[str, Any]) -> bool:
        # Filter here too: not every API server honours the label selector.
        labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
        return labels.get(SERVICE_NAME_LABEL) == self.service

    async def _run(self) -> None:
        assert self._kube is not None
        await list_watch(
            self._kube,
            collection_path("discovery.k8s.io/v1", "endpointslices", self.namespace),
            on_list=self._listed,
            on_event=self._changed,
            label_selector=f"{SERVICE_NAME_LABEL}={self.service}",
            name=f"EndpointSlices of {self.namespace}/{self.service}",
            backoff=BACKOFF_SECONDS,
        )

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self._slices = {item["metadata"]["name"]: item for item in items if self._mine(item)}
        self._publish()
        self._synced.set()

    def _changed(self, kind: str, item: dict[str, Any]) -> None:
        if not self._mine(item):
            return
        name = (item.get("metadata") or {}).get("name")
        if kind == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = item
        self._publish()

    def _publish(self) -> None:
        urls = _engine_urls(self._slices.values(), self.config)
        log.debug("engines of %s/%s: %s", self.namespace, self.service, urls)
        self._on_change(urls)
