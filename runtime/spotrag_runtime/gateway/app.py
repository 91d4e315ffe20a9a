"""The gateway's FastAPI application: ``create_app(config)``.

Order of the checks on an API request: the API key and the body size
(``RequestGuard``, before the body is read or parsed), then validation and
the route.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spotrag_runtime.gateway.config import GatewayConfig
from spotrag_runtime.gateway.errors import APIError, AuthenticationFailed, RequestTooLarge, install_error_handlers
from spotrag_runtime.gateway.routes import chat, rag, system
from spotrag_runtime.gateway.routes.streaming import RAW_SEND
from spotrag_runtime.gateway.routes.ui import ui_router
from spotrag_runtime.gateway.service import Gateway, outcome_of

if TYPE_CHECKING:
    from spotrag_runtime.retrieval import Embedder

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
# Requests counted in spotrag_requests_total (the ones that ask for an answer).
COUNTED_PATHS = {"/v1/chat/completions", "/v1/rag/query"}


class RequestGuard:
    """Checks API requests before any of the body is read: the API key (401)
    when keys are configured, then the body size (413), by its declared
    length and again as it arrives, so an oversized body is never parsed.
    Health, readiness and metrics stay open."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        gateway: Gateway = scope["app"].state.gateway
        headers = Headers(scope=scope)
        error: APIError | None = None
        if gateway.auth is not None and not gateway.auth.is_valid(headers.get("authorization")):
            error = AuthenticationFailed(
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif int(headers.get("content-length") or 0) > self.max_body_bytes:
            error = RequestTooLarge(self._too_large)
        if error is not None:
            if scope["path"] in COUNTED_PATHS:
                gateway.metrics.requests.labels(outcome_of(error)).inc()
            await error.response()(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    @property
    def _too_large(self) -> str:
        return f"The request body is larger than this endpoint's limit of {self.max_body_bytes} bytes."

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                # FastAPI passes its own HTTPException through body reading; the
                # error handlers turn it into OpenAI's shape.
                raise HTTPException(status_code=413, detail=self._too_large)
            return message

        return limited_receive


class GatewayApp(FastAPI):
    """FastAPI, with the server's own ``send`` in each HTTP request's scope
    (``RAW_SEND``): a streamed answer starts through the middleware's send
    wrappers, which only watch for the start, then writes its body there."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(
    config: GatewayConfig,
    *,
    embedder: Embedder | None = None,
    kubeconfig: str | None = None,
    workers: int = 1,
) -> FastAPI:
    """The gateway app. ``embedder`` reuses an already loaded model (tests load
    it once); ``kubeconfig`` is for EndpointSlice discovery out of a cluster;
    ``workers``: how many worker processes of one pod run this app (``config``
    holds this worker's share of the limits)."""
    gateway = Gateway(config, embedder=embedder, kubeconfig=kubeconfig, workers=workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        log.info("gateway for %s/%s serving %r", config.namespace, config.deployment, config.served_model_name)
        try:
            yield
        finally:
            await gateway.close()

    app = GatewayApp(
        title="spotrag gateway",
        summary="OpenAI-compatible, retrieval-augmented chat in front of vLLM engines.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.started_at = int(time.time())
    app.add_middleware(RequestGuard, max_body_bytes=config.admission.max_body_bytes)

    def count_error(request: Request, error: Exception) -> None:
        if request.url.path in COUNTED_PATHS:
            gateway.metrics.requests.labels(outcome_of(error)).inc()

    install_error_handlers(app, on_error=count_error)
    app.include_router(chat.router)
    app.include_router(rag.router)
    app.include_router(system.router)
    if config.ui.enabled:
        app.include_router(ui_router(config))
    return app


# How `spotrag gateway --workers N` hands each worker process its configuration.
WORKER_CONFIG_ENV = "SPOTRAG_GATEWAY_WORKER_CONFIG"


def app_from_environment() -> FastAPI:
    """The app of one worker process of several (uvicorn's factory)."""
    settings = json.loads(os.environ[WORKER_CONFIG_ENV])
    logging.basicConfig(level=settings["logLevel"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GatewayConfig.from_mapping(settings["config"])
    return create_app(config, kubeconfig=settings["kubeconfig"], workers=settings["workers"])
