"""The Kubernetes access the front door needs, in one place: list + watch a
resource (across namespaces or in some), and merge-patch a status. Plain HTTP
with the credentials ``spotrag_runtime.kubeconfig`` loads, as the gateway's
EndpointSlice discovery does; meant to be swapped for a shared access layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx

from spotrag_runtime.kubeconfig import httpx_options, load_configuration

log = logging.getLogger(__name__)

WATCH_SECONDS = 240
RETRY_MIN_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0
# A resource the server does not know (its CRD not installed): look again this often.
MISSING_RESOURCE_SECONDS = 30.0


class KubeClient:
    def __init__(self, kubeconfig: str | None = None) -> None:
        self._kubeconfig = kubeconfig
        self._configuration: Any = None
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._configuration = await asyncio.to_thread(load_configuration, self._kubeconfig)
        timeout = httpx.Timeout(10.0, read=WATCH_SECONDS + 30)
        self.http = httpx.AsyncClient(
            base_url=self._configuration.host, timeout=timeout, **httpx_options(self._configuration)
        )

    async def close(self) -> None:
        if self.http:
            await self.http.aclose()

    def headers(self) -> dict[str, str]:
        # Read per request: in-cluster tokens are rotated.
        auth = self._configuration.auth_settings().get("BearerToken")
        return {"Authorization": auth["value"]} if auth and auth.get("value") else {}

    async def patch_status(self, path: str, status: dict[str, Any]) -> None:
        assert self.http is not None
        response = await self.http.patch(
            f"{path}/status",
            content=json.dumps({"status": status}),
            headers={**self.headers(), "Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()


def collection_path(group: str, version: str, plural: str, namespace: str | None) -> str:
    prefix = "/api/v1" if not group else f"/apis/{group}/{version}"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


class Watcher:
    """Keeps ``items`` ("namespace/name" → object) equal to what the server
    holds at ``path``, calling ``on_change()`` after every change. A 404 (the
    resource type is not installed) counts as an empty, synced list."""

    def __init__(
        self,
        kube: KubeClient,
        path: str,
        *,
        on_change: Callable[[], None],
        label_selector: str = "",
        accept: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.kube = kube
        self.path = path
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._on_change = on_change
        self._selector = label_selector
        self._accept = accept or (lambda _: True)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"spotrag-watch-{self.path}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @staticmethod
    def key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"

    async def _run(self) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                version = await self._list()
                delay = RETRY_MIN_SECONDS
                if version is None:
                    await asyncio.sleep(MISSING_RESOURCE_SECONDS)
                    continue
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("watch of %s failed: %r; retrying in %.1fs", self.path, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self._selector} if self._selector else {}

    async def _list(self) -> str | None:
        assert self.kube.http is not None
        response = await self.kube.http.get(self.path, params=self._params(), headers=self.kube.headers())
        if response.status_code == 404:
            log.info("%s is not served (is its CRD installed?); treating it as empty", self.path)
            self.items = {}
            self._changed()
            return None
        response.raise_for_status()
        listing = response.json()
        self.items = {self.key(item): item for item in listing.get("items") or () if self._accept(item)}
        self._changed()
        return (listing.get("metadata") or {}).get("resourceVersion") or ""

    def _changed(self) -> None:
        self.synced.set()
        self._on_change()

    async def _watch(self, version: str) -> str | None:
        assert self.kube.http is not None
        params = {
            **self._params(),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        if version:
            params["resourceVersion"] = version
        async with self.kube.http.stream("GET", self.path, params=params, headers=self.kube.headers()) as response:
            if response.status_code == 410:
                return None
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return None
                version = (item.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED" or not self._accept(item):
                    if self.items.pop(self.key(item), None) is None:
                        continue
                else:
                    self.items[self.key(item)] = item
                self._on_change()
        return version
