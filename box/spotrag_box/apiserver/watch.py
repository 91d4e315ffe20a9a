"""Watches of the API stand-in: a JSON-lines stream that resumes from a resourceVersion.

The snapshot (or the missed changes) and the subscription are taken in one
synchronous step, so no change falls between them; bookmarks when asked, the
initial-events-end bookmark for streaming lists, and 410 for a resourceVersion
older than the change log remembers.
"""

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp.web

from spotrag_box.apiserver import tables as kube_tables
from spotrag_box.apiserver.errors import ApiError
from spotrag_box.apiserver.reads import Reads, present, selectors, truthy
from spotrag_box.apiserver.registry import Served
from spotrag_box.apiserver.store import CLOSE, Store, Watch

DEFAULT_WATCH_TIMEOUT = 1800.0  # kube-apiserver's --min-request-timeout
BOOKMARK_INTERVAL = 60.0


class Watches:
    def __init__(self, store: Store, reads: Reads) -> None:
        self.store, self.reads = store, reads

    async def serve(
        self, request: aiohttp.web.BaseRequest, served: Served, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        params = request.query
        labels, fields = selectors(served, params)
        try:
            timeout = float(params.get("timeoutSeconds") or 0)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid timeoutSeconds: {params['timeoutSeconds']!r}") from e
        timeout = timeout if timeout > 0 else DEFAULT_WATCH_TIMEOUT  # 0 means "the server's default"
        since = params.get("resourceVersion") or ""
        initial_events = truthy(params.get("sendInitialEvents"))
        bookmarks = truthy(params.get("allowWatchBookmarks"))
        as_table = kube_tables.wants_table(request.headers.get("Accept"))
        watch = Watch(served, namespace, labels, fields)

        # Snapshot and subscribe in one synchronous step: nothing can happen in between.
        backlog: list[tuple[str, Mapping[str, Any]]]
        if since in ("", "0") or initial_events:
            backlog = [("ADDED", obj) for obj in self.store.select(served, namespace, labels, fields)]
        else:
            if not since.isdigit():
                raise ApiError(400, "BadRequest", f"invalid resource version: {since!r}")
            if int(since) < self.store.oldest_resumable:
                return await self._expired(request, since)
            backlog = self.store.changes_since(int(since), watch)
        self.store.subscribe(watch)
        try:
            response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for event_type, obj in backlog:
                await response.write(self._event_line(served, event_type, obj, as_table, params))
            if initial_events:
                await response.write(self._bookmark_line(served, initial_events_end=True))
            deadline = asyncio.get_running_loop().time() + timeout
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                wait = min(remaining, BOOKMARK_INTERVAL) if bookmarks else remaining
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout=wait)
                except TimeoutError:
                    if bookmarks and deadline - asyncio.get_running_loop().time() > 0:
                        await response.write(self._bookmark_line(served))
                    continue
                if item is CLOSE:
                    break
                event_type, obj = item
                await response.write(self._event_line(served, event_type, obj, as_table, params))
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away; nothing to answer
        finally:
            self.store.unsubscribe(watch)
        return response

    async def _expired(self, request: aiohttp.web.BaseRequest, since: str) -> aiohttp.web.StreamResponse:
        """A watch from a resourceVersion we no longer remember: one ERROR event with 410, as etcd's compaction."""
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        error = ApiError(410, "Expired", f"too old resource version: {since} ({self.store.oldest_resumable})")
        await response.write(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
        await response.write_eof()
        return response

    def _event_line(
        self, served: Served, event_type: str, obj: Mapping[str, Any], as_table: bool, params: Mapping[str, str]
    ) -> bytes:
        shown: Any = present(served, dict(obj))
        if as_table:
            shown = self.reads.table(served, [dict(obj)], params)
        return json.dumps({"type": event_type, "object": shown}).encode() + b"\n"

    def _bookmark_line(self, served: Served, *, initial_events_end: bool = False) -> bytes:
        metadata: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
        if initial_events_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        bookmark = {"kind": served.kind, "apiVersion": served.api_version, "metadata": metadata}
        return json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n"
