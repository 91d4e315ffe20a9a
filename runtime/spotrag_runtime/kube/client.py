"""A blocking client for plain dict manifests, for code that runs in threads
(the operator's kopf handlers, the node agent).

It rides on the official `kubernetes` client's ApiClient (so kubeconfig,
in-cluster config, exec credential plugins and token refresh all work as in
any other tool) but speaks in plain dicts and resource paths: one path table
is less code than a typed API per kind.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes

from .errors import KubeError
from .resources import resource_for

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class Kube:
    """CRUD on plain dict manifests; error answers raise KubeError."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        field_manager: str = "spotrag",
        request_timeout: float | tuple[float, float] | None = None,
    ):
        self.api_client = api_client
        self.field_manager = field_manager
        self.request_timeout = request_timeout

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict:
        method, url, headers, body, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=self.request_timeout
        )
        data = response.read()
        if not 200 <= response.status < 300:
            raise KubeError.from_answer(response.status, data, method=method, path=path)
        payload = json.loads(data) if data else {}
        return payload if isinstance(payload, dict) else {}

    # Reads ---------------------------------------------------------------

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self._call("GET", resource_for(api_version, kind).path(namespace, name))
        except KubeError as error:
            if error.not_found:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict]:
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        result = self._call("GET", resource_for(api_version, kind).path(namespace), query=query)
        return result.get("items") or []

    # Writes --------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        resource = resource_for(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace")
        return self._call("POST", resource.path(namespace), body=obj, query={"fieldManager": self.field_manager})

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: dict | list,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        content_type: str = MERGE_PATCH,
    ) -> dict:
        return self._call(
            "PATCH",
            resource_for(api_version, kind).path(namespace, name, subresource),
            body=patch,
            query={"fieldManager": self.field_manager},
            content_type=content_type,
        )

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete; False if it was already gone (deletes are idempotent)."""
        try:
            self._call(
                "DELETE",
                resource_for(api_version, kind).path(namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
            return True
        except KubeError as error:
            if error.not_found:
                return False
            raise

    def ensure(self, desired: dict) -> str:
        """Create `desired`, or merge-patch the live object where it differs.

        Returns "created", "updated" or "unchanged". Only the fields we render
        are compared, so defaults a server adds never cause a write; running
        it twice changes nothing.
        """
        meta = desired["metadata"]
        live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta.get("namespace"))
        if live is None:
            try:
                self.create(desired)
                return "created"
            except KubeError as error:
                if not error.conflict:
                    raise
                # Someone (a previous run of ours) created it meanwhile: compare instead.
                live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta.get("namespace"))
                if live is None:
                    raise
        patch = merge_difference(desired, live) or {}
        patch.pop("status", None)
        if not patch:
            return "unchanged"
        self.patch(desired["apiVersion"], desired["kind"], meta["name"], patch, meta.get("namespace"))
        return "updated"


def merge_difference(desired: Any, live: Any) -> Any:
    """The merge patch that makes `live` carry every field of `desired`.

    Dicts are compared key by key; anything else (lists included, as merge
    patch replaces lists whole) is replaced when it differs. Fields of `live`
    that `desired` does not mention are left alone.
    """
    if isinstance(desired, dict) and isinstance(live, dict):
        patch = {}
        for key, value in desired.items():
            if key not in live:
                patch[key] = value
                continue
            sub = merge_difference(value, live[key])
            if sub is not _SAME:
                patch[key] = sub
        return patch if patch else _SAME
    return _SAME if _normalize(desired) == _normalize(live) else desired


class _Same:
    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<same>"


_SAME: Any = _Same()


def _normalize(value: Any) -> Any:
    # Compare numbers the way JSON sees them (a server may send 1.0 for 1).
    return json.loads(json.dumps(value))
