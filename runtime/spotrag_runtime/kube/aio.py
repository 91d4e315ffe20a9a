"""The asynchronous side: a plain-HTTP client (httpx) for code on an event
loop (the gateway's engine discovery, the box's simulated controllers), and
the one list-then-watch loop they all follow.

The loop lists, then watches from the list's resourceVersion with bookmarks;
a watch the server ends is resumed from where it stopped, a 410 (too old)
lists again at once, and any other failure lists again after a backoff.
Backoff is tenacity's exponential wait, started afresh at every successful
list so one blip an hour later does not wait the maximum.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from kubernetes.client import Configuration
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from .config import auth_headers, httpx_options, load_configuration
from .errors import KubeError
from .resources import object_key

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
DEFAULT_WATCH_SECONDS = 120
DEFAULT_BACKOFF = (0.2, 5.0)  # seconds: first retry, longest wait


class AsyncKube:
    """Path-based calls on plain dicts; error answers raise KubeError."""

    def __init__(self, configuration: Configuration, *, watch_seconds: int = DEFAULT_WATCH_SECONDS):
        self.configuration = configuration
        self.server = configuration.host
        self.watch_seconds = watch_seconds
        self._http = httpx.AsyncClient(
            base_url=configuration.host,
            headers={"Accept": "application/json"},
            timeout=httpx.Timeout(10.0, read=watch_seconds + 30),
            **httpx_options(configuration),
        )

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, **options: Any) -> AsyncKube:
        return cls(load_configuration(kubeconfig), **options)

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        headers = auth_headers(self.configuration) | kwargs.pop("headers", {})
        response = await self._http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            raise KubeError.from_answer(response.status_code, response.content, method=method, path=path)
        return response.json() if response.content else {}

    async def get(self, path: str) -> dict | None:
        try:
            return await self._request("GET", path)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def list(self, path: str, *, label_selector: str | None = None) -> dict:
        params = {"labelSelector": label_selector} if label_selector else {}
        return await self._request("GET", path, params=params)

    async def create(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, json=body)

    async def patch(self, path: str, body: dict | list, content_type: str = MERGE_PATCH) -> dict:
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
        except KubeError as error:
            if error.not_found:
                return False
            raise

    async def watch(
        self, path: str, resource_version: str, *, label_selector: str | None = None
    ) -> AsyncIterator[dict]:
        """The watch events from `resource_version` until the server ends the watch."""
        params = {"watch": "true", "timeoutSeconds": str(self.watch_seconds), "allowWatchBookmarks": "true"}
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        headers = auth_headers(self.configuration)
        async with self._http.stream("GET", path, params=params, headers=headers) as response:
            if response.status_code >= 400:
                raise KubeError.from_answer(response.status_code, await response.aread(), method="GET", path=path)
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)


async def list_watch(
    client: AsyncKube,
    path: str,
    *,
    on_list: Callable[[list[dict]], None],
    on_event: Callable[[str, dict], None],
    label_selector: str | None = None,
    name: str = "",
    backoff: tuple[float, float] = DEFAULT_BACKOFF,
) -> None:
    """Keep `on_list` (every object, after each list) and `on_event` (each
    ADDED/MODIFIED/DELETED) current with `path`, until cancelled."""
    name = name or path
    first, longest = backoff

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("list of %s failed: %r; retrying in %.1fs", name, error, delay)

    async def listed() -> str:
        listing = await client.list(path, label_selector=label_selector)
        on_list(listing.get("items") or [])
        return (listing.get("metadata") or {}).get("resourceVersion") or ""

    while True:
        # A fresh retry state per round: the backoff starts short after every good list.
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=first, max=longest),
            retry=retry_if_exception_type(Exception),
            before_sleep=warn,
        )
        version = await retrying(listed)
        try:
            while True:
                version = await _watch_once(client, path, version, label_selector, on_event)
        except Exception as error:
            if isinstance(error, KubeError) and error.gone:
                continue  # the version is too old: list again now
            log.warning("watch of %s failed: %r; listing again in %.1fs", name, error, first)
        # Even a watch that fails at once (forbidden while list is allowed) must not spin.
        await asyncio.sleep(first)


async def _watch_once(
    client: AsyncKube,
    path: str,
    version: str,
    label_selector: str | None,
    on_event: Callable[[str, dict], None],
) -> str:
    """Follow one watch to its end; the version to resume from."""
    async for event in client.watch(path, version, label_selector=label_selector):
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # a Status object: 410 Gone and friends
            raise KubeError(obj.get("code") or 500, obj.get("reason", ""), obj.get("message", "watch error"))
        version = (obj.get("metadata") or {}).get("resourceVersion") or version
        if kind != "BOOKMARK":
            on_event(kind, obj)
    return version


class Informer:
    """A cache of one kind kept current by `list_watch`; calls every
    listener after each change (listeners only wake controllers up: the
    controllers then read the caches, which is level-triggered and so
    forgives a missed or merged event)."""

    def __init__(
        self,
        client: AsyncKube,
        path: str,
        *,
        label_selector: str | None = None,
        name: str = "",
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
    ):
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.name = name or path
        self.backoff = backoff
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

    def _listed(self, items: list[dict]) -> None:
        fresh = {object_key(item): item for item in items}
        for key in self.cache.keys() - fresh.keys():
            self._notify("DELETED", self.cache[key])
        self.cache = fresh
        self.synced.set()
        for item in fresh.values():
            self._notify("SYNC", item)

    def _changed(self, kind: str, obj: dict) -> None:
        key = object_key(obj)
        if kind == "DELETED":
            self.cache.pop(key, None)
        else:
            self.cache[key] = obj
        self._notify(kind, obj)

    async def run(self) -> None:
        await list_watch(
            self.client,
            self.path,
            on_list=self._listed,
            on_event=self._changed,
            label_selector=self.label_selector,
            name=self.name,
            backoff=self.backoff,
        )
