"""How the simulated controllers talk to Kubernetes: plain HTTP, as any
controller does, and shared informers (list, then watch from the list's
resourceVersion; a dropped watch or a 410 re-lists).

Paths are the API's own (``/api/v1/pods``); objects are plain dicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
WATCH_SECONDS = 120
RETRY_MIN_SECONDS, RETRY_MAX_SECONDS = 0.2, 5.0


class ApiError(Exception):
    """An error answer of the Kubernetes API."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def _connection(kubeconfig: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Server URL, headers and httpx options from a kubeconfig, through the
    kubernetes package's loader (tokens, client certificates, exec plugins)."""
    from spotrag_runtime.kubeconfig import httpx_options, load_configuration

    configuration = load_configuration(kubeconfig)
    headers = {}
    if token := configuration.api_key.get("authorization"):
        headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
    options = httpx_options(configuration)
    return configuration.host, headers, options


def collection_path(api_version: str, plural: str, namespace: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def object_path(
    api_version: str, plural: str, name: str, namespace: str | None = None, subresource: str | None = None
) -> str:
    path = f"{collection_path(api_version, plural, namespace)}/{name}"
    return f"{path}/{subresource}" if subresource else path


class KubeClient:
    def __init__(self, kubeconfig: str):
        self.kubeconfig = kubeconfig
        server, headers, options = _connection(kubeconfig)
        self.server = server
        self._http = httpx.AsyncClient(
            base_url=server,
            headers=headers | {"Accept": "application/json"},
            timeout=httpx.Timeout(10.0, read=WATCH_SECONDS + 30),
            **options,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response.status_code, response.content)
        return response.json() if response.content else {}

    async def get(self, path: str) -> dict | None:
        try:
            return await self._request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, path: str, *, label_selector: str | None = None) -> dict:
        params = {"labelSelector": label_selector} if label_selector else {}
        return await self._request("GET", path, params=params)

    async def create(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, json=body)

    async def patch(self, path: str, body: dict, content_type: str = MERGE_PATCH) -> dict:
        return await self._request("PATCH", path, content=json.dumps(body), headers={"Content-Type": content_type})

    async def delete(
        self, path: str, *, grace_period_seconds: int | None = None, preconditions: dict | None = None
    ) -> bool:
        """False when it was already gone."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if preconditions:
            options["preconditions"] = preconditions
        try:
            await self._request(
                "DELETE", path, content=json.dumps(options), headers={"Content-Type": "application/json"}
            )
            return True
        except ApiError as error:
            if error.status == 404:
                return False
            raise

    async def watch(
        self, path: str, resource_version: str, *, label_selector: str | None = None
    ) -> AsyncIterator[dict]:
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(WATCH_SECONDS),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            params["labelSelector"] = label_selector
        async with self._http.stream("GET", path, params=params) as response:
            if response.status_code == 410:
                raise WatchExpired(path)
            if response.status_code >= 400:
                raise _error(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)


def _error(status: int, content: bytes) -> ApiError:
    try:
        payload = json.loads(content)
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    return ApiError(status, payload.get("reason", ""), payload.get("message") or content.decode(errors="replace")[:500])


def object_key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


class Informer:
    """A cache of one kind kept current by list + watch; calls every
    listener after each change (listeners only wake controllers up: the
    controllers then read the caches, which is level-triggered and so
    forgives a missed or merged event)."""

    def __init__(self, client: KubeClient, path: str, *, label_selector: str | None = None, name: str = ""):
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.name = name or path
        self.cache: dict[tuple[str, str], dict] = {}
        self.synced = asyncio.Event()
        self._listeners: list[Callable[[str, dict], None]] = []

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        self._listeners.append(listener)

    def items(self) -> list[dict]:
        return list(self.cache.values())

    def get(self, namespace: str, name: str) -> dict | None:
        return self.cache.get((namespace or "", name))

    def _notify(self, kind: str, obj: dict) -> None:
        for listener in self._listeners:
            listener(kind, obj)

    async def run(self) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                listing = await self.client.list(self.path, label_selector=self.label_selector)
                fresh = {object_key(item): item for item in listing.get("items") or []}
                for key in self.cache.keys() - fresh.keys():
                    self._notify("DELETED", self.cache[key])
                self.cache = fresh
                version = (listing.get("metadata") or {}).get("resourceVersion") or ""
                self.synced.set()
                for item in fresh.values():
                    self._notify("SYNC", item)
                delay = RETRY_MIN_SECONDS
                while True:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                continue
            except Exception as error:
                log.warning("watch of %s failed: %r; retrying in %.1fs", self.name, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _watch(self, version: str) -> str:
        async for event in self.client.watch(self.path, version, label_selector=self.label_selector):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise WatchExpired(self.path)
                raise ApiError(obj.get("code") or 500, obj.get("reason", ""), obj.get("message", "watch error"))
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            key = object_key(obj)
            if kind == "DELETED":
                self.cache.pop(key, None)
            else:
                self.cache[key] = obj
            self._notify(kind, obj)
        return version
