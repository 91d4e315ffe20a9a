"""The objects of the API stand-in, their resourceVersions, and the changes open watches are handed.

Deleted objects leave the store at once; the change log (bounded) is what a
watch resumes from, and what is older than it answers 410 Gone.
"""

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from spotrag_box.apiserver import selectors as kube_selectors
from spotrag_box.apiserver.registry import ResourceKey, Served

DEFAULT_CHANGE_LOG_SIZE = 5000  # watch resumption window; older resourceVersions get 410 Gone (bounds memory)

Key = tuple[ResourceKey, str | None, str]  # storage resource, namespace (None if cluster-scoped), name

CLOSE = object()  # queued to a watch to end it when the server stops


@dataclasses.dataclass(frozen=True)
class Change:
    resource_version: int
    storage: ResourceKey
    type: str
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None


@dataclasses.dataclass(eq=False)
class Watch:
    served: Served
    namespace: str | None
    labels: tuple[kube_selectors.Requirement, ...]
    fields: tuple[kube_selectors.FieldRequirement, ...]
    queue: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)

    def selects(self, obj: Mapping[str, Any] | None) -> bool:
        return (
            obj is not None
            and (self.namespace is None or obj["metadata"].get("namespace") == self.namespace)
            and kube_selectors.labels_match(self.labels, obj)
            and kube_selectors.fields_match(self.fields, obj)
        )

    def event_type(self, change: Change) -> str | None:
        """What this watch sees of a change: an object leaving the selection reads as DELETED."""
        now, before = self.selects(change.obj), self.selects(change.old)
        if change.type == "MODIFIED":
            return "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
        return change.type if now else None


class Store:
    """Live objects by key; ``commit`` is the only way they change."""

    def __init__(self, *, change_log_size: int = DEFAULT_CHANGE_LOG_SIZE) -> None:
        self.change_log_size = change_log_size
        self.resource_version = 1
        self.oldest_resumable = 0
        self.on_delete: Callable[[], None] = lambda: None  # the garbage collector's cue
        self._objects: dict[Key, dict[str, Any]] = {}
        self._changes: collections.deque[Change] = collections.deque()
        self._watches: set[Watch] = set()

    def key(self, served: Served, namespace: str | None, name: str) -> Key:
        return (served.storage, namespace if served.namespaced else None, name)

    def current(self, served: Served, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._objects.get(self.key(served, namespace, name))

    def live(self, storage: ResourceKey | None = None) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key, obj in list(self._objects.items()):
            if storage is None or key[0] == storage:
                yield key, obj

    def select(
        self,
        served: Served,
        namespace: str | None,
        labels: tuple[kube_selectors.Requirement, ...],
        fields: tuple[kube_selectors.FieldRequirement, ...],
    ) -> list[dict[str, Any]]:
        found = [
            obj
            for (_, ns, _), obj in self.live(served.storage)
            if (namespace is None or ns == namespace)
            and kube_selectors.labels_match(labels, obj)
            and kube_selectors.fields_match(fields, obj)
        ]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    def namespace_is_empty(self, namespace: str) -> bool:
        return not any(key[1] == namespace for key in self._objects)

    def has_dependents(self, uid: str) -> bool:
        return any(
            reference.get("uid") == uid
            for obj in self._objects.values()
            for reference in obj["metadata"].get("ownerReferences") or []
        )

    def next_resource_version(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def commit(self, served: Served, change_type: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Store a change, remember it for watch resumption, and hand it to the open watches."""
        key = self.key(served, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if change_type == "DELETED":
            del self._objects[key]
            self.on_delete()
        else:
            self._objects[key] = obj
        change = Change(int(obj["metadata"]["resourceVersion"]), served.storage, change_type, obj, old)
        if len(self._changes) >= self.change_log_size:
            self.oldest_resumable = self._changes.popleft().resource_version
        self._changes.append(change)
        for watch in list(self._watches):
            if watch.served.storage == served.storage:
                event_type = watch.event_type(change)
                if event_type is not None:
                    watch.queue.put_nowait((event_type, obj))

    def changes_since(self, resource_version: int, watch: Watch) -> list[tuple[str, Mapping[str, Any]]]:
        """What a watch resuming after ``resource_version`` missed, as (event type, object)."""
        return [
            (event_type, change.obj)
            for change in self._changes
            if change.resource_version > resource_version and change.storage == watch.served.storage
            for event_type in [watch.event_type(change)]
            if event_type is not None
        ]

    def subscribe(self, watch: Watch) -> None:
        self._watches.add(watch)

    def unsubscribe(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def close_watches(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(CLOSE)
