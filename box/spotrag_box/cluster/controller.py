"""The loop every simulated controller runs, and the Events they record."""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid

import httpx

from spotrag_runtime.kube import AsyncKube, KubeError, collection_path

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    """Level-triggered: any change a controller is subscribed to wakes it,
    and it then compares the whole desired state with the caches. It also
    wakes every `resync` seconds, which is what retries a failed write."""

    name = "controller"

    def __init__(self, *, resync: float):
        self.resync = resync
        self._wake = asyncio.Event()

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                # cancellation that meets a wake-up, and the loop would never end.
                async with asyncio.timeout(self.resync):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except (KubeError, httpx.HTTPError) as error:
                # Races a controller lives with (a namespace going away, a write on a
                # stale cache): the next pass sees the new state and retries.
                log.info("%s: %s; retrying", self.name, error)
            except Exception:
                log.exception("%s: reconcile failed", self.name)

    async def reconcile(self) -> None:
        raise NotImplementedError


class EventRecorder:
    """core/v1 Events, as `kubectl describe` and `kubectl get events` show them.
    Best effort: an Event that cannot be written is logged, never fatal."""

    def __init__(self, client: AsyncKube, component: str):
        self.client = client
        self.component = component

    async def record(self, obj: dict, event_type: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        timestamp = now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind", ""),
                "name": meta["name"],
                "namespace": meta.get("namespace") or "",
                "uid": meta.get("uid", ""),
            },
            "type": event_type,
            "reason": reason,
            "message": message,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.component,
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        try:
            await self.client.create(collection_path("v1", "events", namespace), event)
        except (KubeError, httpx.HTTPError) as error:
            log.debug("event %s for %s not recorded: %s", reason, meta["name"], error)
