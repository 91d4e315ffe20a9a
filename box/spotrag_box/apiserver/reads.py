"""Reads of the API stand-in: lists with selectors and pages, objects as the requested version, Tables."""

import base64
import json
from collections.abc import Mapping
from typing import Any

from spotrag_box.apiserver import selectors as kube_selectors
from spotrag_box.apiserver import tables as kube_tables
from spotrag_box.apiserver.errors import ApiError
from spotrag_box.apiserver.registry import Served
from spotrag_box.apiserver.store import Store

Selectors = tuple[tuple[kube_selectors.Requirement, ...], tuple[kube_selectors.FieldRequirement, ...]]


class Reads:
    def __init__(self, store: Store) -> None:
        self.store = store

    def page(
        self, served: Served, namespace: str | None, params: Mapping[str, str], accept: str | None
    ) -> dict[str, Any]:
        labels, fields = selectors(served, params)
        items = self.store.select(served, namespace, labels, fields)
        items, continue_token = _paginate(items, params)
        if kube_tables.wants_table(accept):
            return self.table(served, items, params, continue_token)
        metadata: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
        if continue_token:
            metadata["continue"] = continue_token
        return self.as_list(served, items, metadata)

    def as_list(self, served: Served, items: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
        return {
            "kind": served.list_kind,
            "apiVersion": served.api_version,
            "metadata": metadata,
            "items": [present(served, obj) for obj in items],
        }

    def table(
        self,
        served: Served,
        objects: list[dict[str, Any]],
        params: Mapping[str, str],
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        if served.crd is not None:
            columns = kube_tables.custom_resource_columns(served.crd_version)
        else:
            columns = kube_tables.BUILTIN_COLUMNS.get(served.kind, kube_tables.DEFAULT_COLUMNS)
        return kube_tables.build_table(
            [present(served, obj) for obj in objects],
            columns=columns,
            resource_version=str(self.store.resource_version),
            include_object=params.get("includeObject", "Metadata"),
            continue_token=continue_token,
        )


def present(served: Served, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the requested version shows it (CRD versions convert with strategy None)."""
    if obj.get("apiVersion") == served.api_version:
        return obj
    return {**obj, "apiVersion": served.api_version}


def selectors(served: Served, params: Mapping[str, str]) -> Selectors:
    """The labelSelector and fieldSelector of a request (a CRD's selectableFields included)."""
    try:
        labels = kube_selectors.parse_label_selector(params.get("labelSelector"))
        selectable = frozenset(
            field["jsonPath"].lstrip(".")
            for field in (served.crd_version.get("selectableFields") or [] if served.crd else [])
        )
        fields = kube_selectors.parse_field_selector(
            params.get("fieldSelector"), kind=served.kind, extra_fields=selectable
        )
    except kube_selectors.SelectorError as e:
        raise ApiError(400, "BadRequest", str(e)) from e
    return labels, fields


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def integer(params: Mapping[str, str], name: str) -> int:
    try:
        return int(params.get(name) or 0)
    except ValueError as e:
        raise ApiError(400, "BadRequest", f"{name}: invalid integer {params[name]!r}") from e


def _paginate(items: list[dict[str, Any]], params: Mapping[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    """limit/continue: the token names the last item served; items are sorted by namespace/name."""
    start = 0
    if params.get("continue"):
        try:
            after = json.loads(base64.urlsafe_b64decode(params["continue"]))["after"]
        except (ValueError, KeyError) as e:
            raise ApiError(400, "BadRequest", f"invalid continue token: {params['continue']!r}") from e
        start = next(
            (
                i
                for i, obj in enumerate(items)
                if [obj["metadata"].get("namespace") or "", obj["metadata"]["name"]] > after
            ),
            len(items),
        )
    limit = integer(params, "limit")
    if limit <= 0 or start + limit >= len(items):
        return items[start:], None
    page = items[start : start + limit]
    last = page[-1]["metadata"]
    token = base64.urlsafe_b64encode(json.dumps({"after": [last.get("namespace") or "", last["name"]]}).encode())
    return page, token.decode()
