"""The HTTP face of the API stand-in: the request log, fault injection, URL routing and per-verb dispatch.

It is the aiohttp handler itself (``await handler(request)``); every answer
other than success is an ``ApiError`` rendered as a meta/v1 Status, and a bug
here reaches the client as a 500, as kube-apiserver would answer.
"""

import collections
import dataclasses
import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import multidict
import yaml

from spotrag_box.apiserver import patches as kube_patches
from spotrag_box.apiserver import protobuf as kube_protobuf
from spotrag_box.apiserver import tables as kube_tables
from spotrag_box.apiserver.deletion import Deletions
from spotrag_box.apiserver.discovery import Discovery
from spotrag_box.apiserver.errors import REASONS, ApiError, no_such_path
from spotrag_box.apiserver.reads import Reads, integer, present, selectors, truthy
from spotrag_box.apiserver.registry import Registry, Served
from spotrag_box.apiserver.store import Store
from spotrag_box.apiserver.subresources import Subresources
from spotrag_box.apiserver.watch import Watches
from spotrag_box.apiserver.writes import Writes, apply_patch

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_LOG_SIZE = 5000


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it; ``status`` is the HTTP status it answered.

    ``id`` counts requests from 1 and never repeats, so ``requests(since=mark)``
    finds what came after a mark even once the bounded log has dropped old ones.
    """

    id: int
    method: str
    path: str
    query: dict[str, str]
    body: Any  # parsed JSON or YAML; text if neither; None if empty
    content_type: str = ""
    status: int | None = None


@dataclasses.dataclass
class _Fault:
    method: str
    path_regex: re.Pattern[str]
    status: int
    times: int


@dataclasses.dataclass(frozen=True)
class _Unparsable:
    text: str
    error: str
    status: int = 400


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a resource URL names."""

    served: Served
    namespace: str | None
    name: str | None
    subresource: str | None


class HttpHandler:
    def __init__(
        self,
        *,
        registry: Registry,
        store: Store,
        writes: Writes,
        deletions: Deletions,
        subresources: Subresources,
        discovery: Discovery,
        watches: Watches,
        reads: Reads,
        request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
    ) -> None:
        self.registry, self.store, self.writes, self.deletions = registry, store, writes, deletions
        self.subresources = subresources
        self.discovery, self.watches, self.reads = discovery, watches, reads
        self._log: collections.deque[RecordedRequest] = collections.deque(maxlen=request_log_size)
        self._log_lock = threading.Lock()  # the log and the faults are read and set from other threads
        self._request_count = 0
        self._faults: list[_Fault] = []
        self._faults_lock = threading.Lock()

    # --- the request log and injected faults -----------------------------------------------------

    def inject_faults(self, *, method: str, path_regex: str, status: int, times: int = 1) -> None:
        with self._faults_lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.times > 0 and fault.method in ("*", method) and fault.path_regex.search(path):
                    fault.times -= 1
                    return fault
        return None

    def recorded_requests(self, since: int = 0) -> list[RecordedRequest]:
        with self._log_lock:
            return [dataclasses.replace(request) for request in self._log if request.id > since]

    @property
    def request_count(self) -> int:
        return self._request_count

    async def __call__(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body_bytes = await request.read()
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        with self._log_lock:
            self._request_count += 1
            record = RecordedRequest(
                id=self._request_count,
                method=request.method,
                path=request.path,
                query=dict(request.query),
                body=_parse_body(body_bytes, content_type),
                content_type=content_type,
            )
            self._log.append(record)
        try:
            fault = self._take_fault(request.method, request.path)
            if fault is not None:
                raise ApiError(
                    fault.status,
                    REASONS.get(fault.status, "InternalError"),
                    f"injected fault: {fault.status} for {request.method} {request.path}",
                    headers={"Retry-After": "1"} if fault.status == 429 else None,
                )
            if isinstance(record.body, _Unparsable):
                raise ApiError(
                    record.body.status,
                    REASONS[record.body.status],
                    f"the request body is not valid {content_type or 'JSON'}: {record.body.error}",
                )
            response = await self._route(request, record)
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)
        except Exception as e:  # a bug here must reach the client as a 500, as kube-apiserver would answer
            logger.exception("The Kubernetes API stand-in failed on %s %s", request.method, request.path)
            error = ApiError(500, "InternalError", f"Internal error occurred: {e!r}")
            response = aiohttp.web.json_response(error.status(), status=500)
        record.status = response.status
        return response

    # --- routing ------------------------------------------------------------------------------

    async def _route(self, request: aiohttp.web.BaseRequest, record: RecordedRequest) -> aiohttp.web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method == "GET":
            document = self.discovery.document(path)
            if document is not None:
                return aiohttp.web.json_response(document)
            if path in ("/healthz", "/livez", "/readyz"):
                return aiohttp.web.Response(text="ok")
            if path in ("/openapi/v2", "/openapi/v3"):
                return self.discovery.openapi(path, request.headers.get("Accept", ""))
        target = self._target(path)
        if request.method == "GET" and target.name is None and truthy(request.query.get("watch")):
            record.status = 200  # a watch streams until it ends; the log shows it as answered meanwhile
            return await self.watches.serve(request, target.served, target.namespace)
        return self._dispatch(request, record, target)

    def _target(self, path: str) -> _Target:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise no_such_path()
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = self.registry.lookup(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise no_such_path()
        served = self.registry.lookup(group, version, rest[0])
        if served is None:
            raise no_such_path()
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None and subresource not in served.subresources:
            raise no_such_path()
        if served.namespaced and name is not None and namespace is None:
            raise no_such_path()
        return _Target(served, namespace, name, subresource)

    def _dispatch(
        self, request: aiohttp.web.BaseRequest, record: RecordedRequest, target: _Target
    ) -> aiohttp.web.StreamResponse:
        served, namespace, name, subresource = target.served, target.namespace, target.name, target.subresource
        method, params, body = request.method, request.query, record.body
        if method == "GET" and name is None:
            return aiohttp.web.json_response(self.reads.page(served, namespace, params, request.headers.get("Accept")))
        if method == "GET" and name is not None:
            return self._get(request, target)
        if method == "POST" and name is None and served.plural == "bindings":
            assert namespace is not None
            self.subresources.bind(namespace, body)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "POST" and name is None:
            obj, warnings = self.writes.create(served, namespace, body, **_write_options(params))
            return _json_response(present(served, obj), 201, warnings)
        if method == "POST" and subresource == "eviction":
            assert namespace is not None and name is not None
            self.subresources.evict(namespace, name, body)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "POST" and subresource == "binding":
            assert namespace is not None
            self.subresources.bind(namespace, body, pod_name=name)
            return aiohttp.web.json_response(_success(201), status=201)
        if method == "PUT" and name is not None:
            if subresource == "scale":
                return aiohttp.web.json_response(self.subresources.write_scale(served, namespace, name, body))
            obj, warnings = self.writes.update(
                served, namespace, name, body, subresource=subresource, **_write_options(params)
            )
            return _json_response(present(served, obj), 200, warnings)
        if method == "PATCH" and name is not None:
            return self._patch(request, record, target)
        if method == "DELETE":
            return self._delete(request, record, target)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    # --- verbs with more to say -----------------------------------------------------------------

    def _get(self, request: aiohttp.web.BaseRequest, target: _Target) -> aiohttp.web.Response:
        served, name = target.served, target.name
        assert name is not None
        obj = self.writes.existing(served, target.namespace, name)
        if target.subresource == "scale":
            return aiohttp.web.json_response(self.subresources.scale_of(served, obj))
        if kube_tables.wants_table(request.headers.get("Accept")):
            return aiohttp.web.json_response(self.reads.table(served, [obj], request.query))
        return aiohttp.web.json_response(present(served, obj))

    def _patch(
        self, request: aiohttp.web.BaseRequest, record: RecordedRequest, target: _Target
    ) -> aiohttp.web.Response:
        served, namespace, name = target.served, target.namespace, target.name
        assert name is not None
        if target.subresource == "scale":
            current_scale = self.subresources.scale_of(served, self.writes.existing(served, namespace, name))
            patched = apply_patch(record.content_type, current_scale, record.body, strategic=True)
            return aiohttp.web.json_response(self.subresources.write_scale(served, namespace, name, patched))
        obj, warnings, status = self.writes.patch(
            served,
            namespace,
            name,
            record.content_type,
            record.body,
            subresource=target.subresource,
            field_manager=request.query.get("fieldManager"),
            **_write_options(request.query),
        )
        return _json_response(present(served, obj), status, warnings)

    def _delete(
        self, request: aiohttp.web.BaseRequest, record: RecordedRequest, target: _Target
    ) -> aiohttp.web.Response:
        served, namespace, params = target.served, target.namespace, request.query
        options = dict(record.body) if isinstance(record.body, Mapping) else {}
        if "propagationPolicy" in params:
            options["propagationPolicy"] = params["propagationPolicy"]
        if "orphanDependents" in params:
            options["orphanDependents"] = truthy(params["orphanDependents"])
        if "gracePeriodSeconds" in params:
            options["gracePeriodSeconds"] = integer(params, "gracePeriodSeconds")
        dry_run = params.get("dryRun") == "All"
        if target.name is not None:
            obj = self.deletions.delete(served, namespace, target.name, options, dry_run=dry_run)
            return aiohttp.web.json_response(present(served, obj))
        labels, fields = selectors(served, params)
        deleted = [
            self.deletions.delete(
                served, obj["metadata"].get("namespace"), obj["metadata"]["name"], options, dry_run=dry_run
            )
            for obj in self.store.select(served, namespace, labels, fields)
        ]
        metadata = {"resourceVersion": str(self.store.resource_version)}
        return aiohttp.web.json_response(self.reads.as_list(served, deleted, metadata))


def _write_options(params: Mapping[str, str]) -> dict[str, Any]:
    return {"dry_run": params.get("dryRun") == "All", "field_validation": params.get("fieldValidation", "Warn")}


def _success(code: int) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}


def _json_response(data: Any, status: int, warnings: list[str]) -> aiohttp.web.Response:
    headers = multidict.CIMultiDict[str]()
    for warning in warnings:
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return aiohttp.web.json_response(data, status=status, headers=headers)


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if content_type == kube_protobuf.CONTENT_TYPE:
        try:
            return kube_protobuf.decode(body)
        except kube_protobuf.ProtobufUnsupported as e:
            return _Unparsable(repr(body[:200]), str(e), 415)
    text = body.decode("utf-8", errors="replace")
    try:
        if content_type == kube_patches.APPLY_PATCH or content_type.endswith("yaml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        return _Unparsable(text, str(e))
