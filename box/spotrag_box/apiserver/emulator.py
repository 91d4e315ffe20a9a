"""The Kubernetes API stand-in, wired from its parts; ``server.py`` serves it over HTTP.

It behaves as kube-apiserver does where kopf, the ``kubernetes`` client,
kubectl and helm look. Each concern is one module:

- ``registry.py``: which resources are served (built-ins, kopf's peerings, applied CRDs)
- ``store.py``: the objects, resourceVersions, the change log and open watches
- ``validation.py`` and ``crd_admission.py``: what a write is checked against and defaulted with
- ``writes.py``: create, update, every PATCH type, server-side apply
- ``deletion.py``: DELETE with preconditions, propagation policies, finalizers and grace periods
- ``collector.py``: garbage collection by ownerReferences, namespace and CRD cleanup
- ``subresources.py``: /scale, /eviction (PodDisruptionBudgets), /binding
- ``reads.py``, ``watch.py``: lists, Tables, selectors, pages; watches that resume
- ``discovery.py``: /api, /apis, /version, OpenAPI
- ``http.py``: the request log, fault injection, routing; ``errors.py``: the one error type

All state changes run synchronously on the event loop that serves the HTTP
requests, so one change is atomic with respect to every other request, watch and
garbage-collection pass.

kmock is not a dependency. The stand-in began as a subclass of kmock 0.8's
KubernetesEmulator, but kept only its object store and resource table: its
request entry point had to be replaced (its URL parser misreads
``/api/v1/namespaces`` and its request log is rescanned on every request), so
its request assertions and reaction DSL never saw a request, and the subclass
reached into ``kmock._internal`` (hence an exact pin). What was used is now a
dict (``store.py``), a dict (``registry.py``) and kmock's bundled discovery
data, copied into ``builtin_resources.json``. Tests assert on the requests
this server records (``KubeAPIServer.requests``).
"""

from spotrag_box.apiserver.collector import GarbageCollector
from spotrag_box.apiserver.deletion import Deletions
from spotrag_box.apiserver.discovery import DEFAULT_SERVER_VERSION, Discovery
from spotrag_box.apiserver.http import DEFAULT_REQUEST_LOG_SIZE, HttpHandler
from spotrag_box.apiserver.reads import Reads
from spotrag_box.apiserver.registry import NAMESPACES, Registry
from spotrag_box.apiserver.store import Store
from spotrag_box.apiserver.subresources import Subresources
from spotrag_box.apiserver.watch import Watches
from spotrag_box.apiserver.writes import Writes

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class KubeEmulator:
    """The parts of the stand-in, wired; call ``http`` (an aiohttp handler) to serve it."""

    def __init__(
        self,
        *,
        server_version: str = DEFAULT_SERVER_VERSION,
        server_address: str = "127.0.0.1:6443",
        graceful_pod_deletion: bool = True,
        request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
    ) -> None:
        self.registry = Registry()
        self.store = Store()
        self.writes = Writes(self.registry, self.store)
        self.deletions = Deletions(self.registry, self.store, self.writes, graceful_pod_deletion=graceful_pod_deletion)
        self.collector = GarbageCollector(self.registry, self.store, self.writes, self.deletions)
        self.store.on_delete = self.collector.schedule
        self.subresources = Subresources(self.registry, self.store, self.writes, self.deletions)
        self.discovery = Discovery(self.registry, server_version=server_version, server_address=server_address)
        reads = Reads(self.store)
        self.http = HttpHandler(
            registry=self.registry,
            store=self.store,
            writes=self.writes,
            deletions=self.deletions,
            subresources=self.subresources,
            discovery=self.discovery,
            watches=Watches(self.store, reads),
            reads=reads,
            request_log_size=request_log_size,
        )
        namespaces = self.registry.served(NAMESPACES)
        for namespace in INITIAL_NAMESPACES:
            self.writes.create(namespaces, None, {"metadata": {"name": namespace}})
