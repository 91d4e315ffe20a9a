"""The one way spotrag reaches Kubernetes.

- config: one kubeconfig / in-cluster loader (the `kubernetes` package's),
  and what an httpx client needs to talk to the same server;
- resources: resource paths and selectors;
- errors: KubeError, the one error type (status, reason, RBAC wording);
- client: `Kube`, blocking CRUD on plain dicts over the package's ApiClient
  (the operator's handlers, the node agent);
- aio: `AsyncKube` over httpx, the one list-then-watch loop with tenacity's
  backoff, and an `Informer` cache on it (gateway discovery, the box).
"""

from .aio import AsyncKube, Informer, list_watch
from .client import JSON_PATCH, MERGE_PATCH, Kube, merge_difference
from .config import api_client, auth_headers, httpx_options, load_configuration
from .errors import KubeError
from .resources import (
    RESOURCES,
    Resource,
    collection_path,
    label_selector,
    object_key,
    object_path,
    owner_reference,
    resource_for,
)

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "RESOURCES",
    "AsyncKube",
    "Informer",
    "Kube",
    "KubeError",
    "Resource",
    "api_client",
    "auth_headers",
    "collection_path",
    "httpx_options",
    "label_selector",
    "list_watch",
    "load_configuration",
    "merge_difference",
    "object_key",
    "object_path",
    "owner_reference",
    "resource_for",
]
