"""The front door's HTTP API: ``create_app(config)``.

    POST /v1/chat/completions, /v1/completions, /v1/rag/query   routed by "model"
    GET  /v1/models, /v1/models/{id}   every model served (that the key may use)
    GET  /healthz, /readyz, /metrics

Per request: the API key (401), the body (413, 400), the model (400 when
missing and several are served, 404 ``model_not_found`` listing what exists),
a variant by weight (503 ``no_backend`` when none may take it), the question's
moderation (400 ``content_filter``), then the gateway; its answer is relayed
(moderated in windows when the RAGDeployment asks for it). Errors use the
gateway's builder, so both speak one error shape.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from spotrag_runtime.frontdoor.auth import KeyRing
from spotrag_runtime.frontdoor.config import FrontDoorConfig
from spotrag_runtime.frontdoor.discovery import Directory, KubeDiscovery, Snapshot, StaticDiscovery
from spotrag_runtime.frontdoor.metrics import FrontDoorMetrics
from spotrag_runtime.frontdoor.proxy import Upstream, answer_text, moderated_events
from spotrag_runtime.frontdoor.routing import Backend, RouteTable, Variant
from spotrag_runtime.frontdoor.routing import Route as ModelRoute
from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.errors import (
    APIError,
    AuthenticationFailed,
    EnginesFailed,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    Unavailable,
)
from spotrag_runtime.moderation import Moderator, Verdict, message_text, redact

log = logging.getLogger(__name__)

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/rag/query")
# Request headers passed on to the gateway (besides the sticky header).
FORWARDED_HEADERS = ("accept", "x-spotrag-rag", "x-request-id", "traceparent", "tracestate")
VARIANT_HEADER = "X-Spotrag-Variant"


class FrontDoor:
    """What the routes share, built once at start (``app.state.frontdoor``)."""

    def __init__(self, config: FrontDoorConfig, *, kubeconfig: str | None = None) -> None:
        self.config = config
        self.directory = Directory()
        self.discovery: StaticDiscovery | KubeDiscovery = (
            StaticDiscovery(config, self.directory)
            if config.static
            else KubeDiscovery(config, self.directory, kubeconfig=kubeconfig)
        )
        self.upstream = Upstream(
            connect_timeout=config.connect_timeout_seconds, read_timeout=config.read_timeout_seconds
        )
        self.metrics = FrontDoorMetrics(lambda: self.directory.table)
        self.keys = KeyRing(config.api_keys_dir) if config.api_keys_dir else None
        self.rng = random.Random()
        self._checker_http: httpx.AsyncClient | None = None
        self._moderators: dict[str, tuple[Any, Moderator]] = {}

    async def start(self) -> None:
        self._checker_http = httpx.AsyncClient(timeout=None)
        await self.discovery.start()

    async def close(self) -> None:
        await self.discovery.close()
        await self.upstream.close()
        if self._checker_http is not None:
            await self._checker_http.aclose()

    def moderator(self, backend: Backend) -> Moderator | None:
        if backend.moderation is None or self._checker_http is None:
            return None
        cached = self._moderators.get(backend.key)
        if cached is None or cached[0] is not backend.moderation:
            cached = (backend.moderation, Moderator(backend.moderation, self._checker_http))
            self._moderators[backend.key] = cached
        return cached[1]

    def visible_models(self, table: RouteTable, key_name: str | None) -> list[str]:
        allowed = self.config.models_by_key.get(key_name) if key_name is not None else None
        return [m for m in table.models if allowed is None or m in allowed]

    def authenticate(self, request: Request) -> str | None:
        if self.keys is None:
            return None
        name = self.keys.identify(request.headers.get("authorization"))
        if name is None:
            raise AuthenticationFailed(
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return name


# --- routed requests ---------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = RequestTooLarge(f"The request body is larger than this endpoint's limit of {limit} bytes.")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _resolve(table: RouteTable, visible: list[str], model: Any) -> ModelRoute:
    if model is None or model == "":
        if len(visible) == 1:
            return table.routes[visible[0]]
        if not visible:
            raise Unavailable("No model is served here yet.", code="no_model")
        raise InvalidRequest(
            f"'model' is required: this endpoint serves {len(visible)} models: {', '.join(visible)}.", param="model"
        )
    if not isinstance(model, str) or model not in visible:
        listing = ", ".join(visible) or "none"
        raise NotFound(
            f"The model '{model}' does not exist. Models served here: {listing}.",
            param="model",
            code="model_not_found",
        )
    return table.routes[model]


async def _moderate_input(
    frontdoor: FrontDoor, path: str, body: dict[str, Any], moderator: Moderator, labels: tuple[str, str]
) -> bool:
    """Check the question; True when redaction changed the body."""
    target: Any
    if path == "/v1/rag/query":
        target, text = body, message_text(body.get("question"))
        field = "question"
    elif path == "/v1/completions":
        prompt = body.get("prompt")
        target, field = body, "prompt"
        text = prompt if isinstance(prompt, str) else "\n".join(p for p in prompt or () if isinstance(p, str))
    else:
        users = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return False
        target, field = users[-1], "content"
        text = message_text(target.get("content"))
    verdict = await moderator.check_input(text)
    _count(frontdoor, labels, "input", verdict)
    if verdict.blocked:
        raise verdict.error("input")
    if verdict.text is None:
        return False
    value = target.get(field)
    if isinstance(value, str):
        target[field] = redact(value)
    elif isinstance(value, list):
        target[field] = [
            {**part, "text": redact(part["text"])}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else redact(part)
            if isinstance(part, str)
            else part
            for part in value
        ]
    return True


def _count(frontdoor: FrontDoor, labels: tuple[str, str], stage: str, verdict: Verdict) -> None:
    if verdict.blocked:
        outcome = "blocked"
    elif verdict.checker_failed:
        outcome = "checker_error"
    elif verdict.text is not None:
        outcome = "redacted"
    else:
        outcome = "allowed"
    frontdoor.metrics.moderation.labels(*labels, stage, outcome, verdict.reason or "").inc()


def _forward_headers(request: Request, sticky_header: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    for name in FORWARDED_HEADERS:
        if value := request.headers.get(name):
            headers[name] = value
    if sticky_header and (value := request.headers.get(sticky_header)):
        headers[sticky_header] = value
    return headers


async def routed(request: Request) -> Response:
    frontdoor: FrontDoor = request.app.state.frontdoor
    started = time.perf_counter()
    labels = ("", "")
    try:
        key_name = frontdoor.authenticate(request)
        raw = await _read_body(request, frontdoor.config.max_body_bytes)
        try:
            body = fastjson.loads(raw)
        except fastjson.JSONDecodeError as error:
            raise InvalidRequest(f"The request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        snapshot = frontdoor.directory.current
        table = snapshot.table
        route = _resolve(table, frontdoor.visible_models(table, key_name), body.get("model"))
        labels = (route.model, "")
        sticky = request.headers.get(route.sticky_header) if route.sticky_header else None
        variant = route.pick(sticky, frontdoor.rng, snapshot.usable)
        if variant is None:
            raise Unavailable(
                f"No RAGDeployment behind model '{route.model}' can take requests now"
                f"{' (' + '; '.join(route.problems) + ')' if route.problems else ''}.",
                code="no_backend",
            )
        labels = (route.model, variant.backend.key)
        return await _forward(request, frontdoor, snapshot, route, variant, body, raw, labels, started)
    except APIError as error:
        frontdoor.metrics.requests.labels(*labels, str(error.status)).inc()
        return error.response()
    except ClientDisconnect:
        frontdoor.metrics.requests.labels(*labels, "499").inc()
        return Response(status_code=499)


async def _forward(
    request: Request,
    frontdoor: FrontDoor,
    snapshot: Snapshot,
    route: ModelRoute,
    variant: Variant,
    body: dict[str, Any],
    raw: bytes,
    labels: tuple[str, str],
    started: float,
) -> Response:
    backend = variant.backend
    changed = False
    if body.get("model") != backend.served_model:
        body["model"] = backend.served_model
        changed = True
    moderator = frontdoor.moderator(backend)
    if moderator is not None and moderator.config.input:
        changed |= await _moderate_input(frontdoor, request.url.path, body, moderator, labels)
    payload = fastjson.dumps(body) if changed else raw
    headers = _forward_headers(request, route.sticky_header)
    upstream = None
    for _attempt in range(2):  # a gateway that refuses the connection: once more, maybe on another pod
        url = snapshot.url(backend)
        if url is None:
            raise Unavailable(f"RAGDeployment {backend.key} has no ready gateway.", code="no_backend")
        try:
            upstream = await frontdoor.upstream.send(url + request.url.path, payload, headers)
            break
        except aiohttp.ClientConnectionError as error:
            log.warning("gateway of %s at %s: %r", backend.key, url, error)
        except TimeoutError:
            break
    if upstream is None:
        raise EnginesFailed(f"The gateway of {backend.key} could not be reached.", code="gateway_unreachable")
    inflight = frontdoor.metrics.inflight.labels(*labels)
    inflight.inc()
    answer_headers = {VARIANT_HEADER: backend.key}
    moderate = moderator is not None and moderator.config.output and upstream.status == 200
    if upstream.content_type != "text/event-stream":
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            upstream.close()
            inflight.dec()
            raise EnginesFailed(f"The gateway of {backend.key} broke off its answer.", code="gateway_failed") from None
        upstream.release()
        inflight.dec()
        frontdoor.metrics.time_to_first_byte.labels(*labels).observe(time.perf_counter() - started)
        status = upstream.status
        if moderate and moderator is not None:
            try:
                text = answer_text(fastjson.loads(data))
            except (fastjson.JSONDecodeError, AttributeError):
                text = ""
            verdict = await moderator.check_output(text, text)
            _count(frontdoor, labels, "output", verdict)
            if verdict.blocked:
                raise verdict.error("output")
        frontdoor.metrics.requests.labels(*labels, str(status)).inc()
        frontdoor.metrics.duration.labels(*labels).observe(time.perf_counter() - started)
        return Response(data, status_code=status, media_type=upstream.content_type, headers=answer_headers)

    chunks: AsyncIterator[bytes] = upstream.content.iter_any()
    if moderate and moderator is not None:
        chunks = moderated_events(
            chunks, moderator, on_verdict=lambda verdict: _count(frontdoor, labels, "output", verdict)
        )
    stream = _Stream(frontdoor, upstream, labels, started, moderated=moderate)
    return SSEResponse(stream.relay(chunks), headers=answer_headers, finish=stream.finish)


class _Stream:
    """One relayed answer stream; ``finish`` runs once, whether the stream
    ended, broke, or never started (a client gone before the first byte)."""

    def __init__(
        self,
        frontdoor: FrontDoor,
        upstream: aiohttp.ClientResponse,
        labels: tuple[str, str],
        started: float,
        *,
        moderated: bool,
    ) -> None:
        self.frontdoor, self.upstream, self.labels, self.started = frontdoor, upstream, labels, started
        self.moderated = moderated
        self.code = "499"  # until the stream says otherwise: the client went away
        self._finished = False

    async def relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        metrics, first = self.frontdoor.metrics, True
        try:
            async for data in chunks:
                if first:
                    metrics.time_to_first_byte.labels(*self.labels).observe(time.perf_counter() - self.started)
                    first = False
                if self.moderated and b'"content_filter"' in data:
                    self.code = "content_filter"
                yield data
            if self.code == "499":
                self.code = str(self.upstream.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("stream from %s broke: %r", self.labels[1], error)
            self.code = "stream_error"
            yield b"\n\n" + EnginesFailed("The gateway broke off this answer.", code="gateway_failed").sse_event()
        finally:
            self.finish()

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.upstream.content.at_eof():
            self.upstream.release()  # read to the end: the connection goes back to the pool
        else:
            self.upstream.close()  # cut short: the gateway sees its client leave and stops the engine
        metrics = self.frontdoor.metrics
        metrics.inflight.labels(*self.labels).dec()
        metrics.requests.labels(*self.labels, self.code).inc()
        metrics.duration.labels(*self.labels).observe(time.perf_counter() - self.started)


class SSEResponse(StreamingResponse):
    """Closes its iterator also when the client leaves mid-stream, so the
    gateway's request is closed at once; ``finish`` covers a stream that
    never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str], finish: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self._events = content
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]
            self._finish()


# --- models, health, metrics -------------------------------------------------


def _card(route: ModelRoute, snapshot: Snapshot, created: int) -> dict[str, Any]:
    shares = route.shares()
    return {
        "id": route.model,
        "object": "model",
        "created": created,
        "owned_by": "spotrag",
        "spotrag": {
            "source": route.source,
            "variants": [
                {
                    "ragDeployment": v.backend.key,
                    "servedModelName": v.backend.served_model,
                    "weight": v.weight,
                    "share": round(shares.get(v.backend.key, 0.0), 6),
                    "ready": v.backend.ready,
                    "reachable": snapshot.usable(v.backend),
                }
                for v in route.variants
            ],
            "problems": list(route.problems),
        },
    }


async def list_models(request: Request) -> Response:
    frontdoor: FrontDoor = request.app.state.frontdoor
    try:
        key_name = frontdoor.authenticate(request)
    except APIError as error:
        return error.response()
    snapshot = frontdoor.directory.current
    table = snapshot.table
    created = request.app.state.started_at
    return JSONResponse(
        {
            "object": "list",
            "data": [_card(table.routes[m], snapshot, created) for m in frontdoor.visible_models(table, key_name)],
            "spotrag_problems": list(table.problems) if frontdoor.keys is None else [],
        }
    )


async def get_model(request: Request) -> Response:
    frontdoor: FrontDoor = request.app.state.frontdoor
    try:
        key_name = frontdoor.authenticate(request)
        snapshot = frontdoor.directory.current
        route = _resolve(
            snapshot.table, frontdoor.visible_models(snapshot.table, key_name), request.path_params["model"]
        )
    except APIError as error:
        return error.response()
    return JSONResponse(_card(route, snapshot, request.app.state.started_at))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    frontdoor: FrontDoor = request.app.state.frontdoor
    if not frontdoor.directory.synced:
        return Unavailable("Not ready: the RAGDeployments are not listed yet.", code="not_ready").response()
    table = frontdoor.directory.table
    return JSONResponse({"status": "ready", "models": table.models, "problems": table.problems})


async def metrics(request: Request) -> Response:
    frontdoor: FrontDoor = request.app.state.frontdoor
    return Response(generate_latest(frontdoor.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def not_found(request: Request, _: Exception) -> Response:
    return NotFound(f"No such endpoint: {request.method} {request.url.path}").response()


async def unexpected(request: Request, _: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return APIError("The front door failed to handle this request; see its log.").response()


def create_app(config: FrontDoorConfig, *, kubeconfig: str | None = None) -> Starlette:
    frontdoor = FrontDoor(config, kubeconfig=kubeconfig)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await frontdoor.start()
        try:
            yield
        finally:
            await frontdoor.close()

    routes = [Route(path, routed, methods=["POST"]) for path in ROUTED_PATHS]
    routes += [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.add_exception_handler(Exception, unexpected)
    app.state.frontdoor = frontdoor
    app.state.started_at = int(time.time())
    return app
