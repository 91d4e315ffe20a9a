"""The gateway's FastAPI application: ``create_app(config)``.

Order of the checks on an API request: the API key (before the body is
read), the body size (FastAPI's ``max_body_size``: refused before it is
parsed), then validation and the route.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from spotrag_runtime.gateway.config import GatewayConfig
from spotrag_runtime.gateway.errors import AuthenticationFailed, install_error_handlers
from spotrag_runtime.gateway.routes import chat, rag, system
from spotrag_runtime.gateway.service import Gateway, outcome_of

if TYPE_CHECKING:
    from spotrag_runtime.retrieval import Embedder

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
# Requests counted in spotrag_requests_total (the ones that ask for an answer).
COUNTED_PATHS = {"/v1/chat/completions", "/v1/rag/query"}


class APIKeyGuard:
    """Refuses API requests without an accepted ``Authorization: Bearer`` key
    before anything else is read. Health, readiness and metrics stay open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            gateway: Gateway = scope["app"].state.gateway
            if gateway.auth is not None and not gateway.auth.is_valid(Headers(scope=scope).get("authorization")):
                error = AuthenticationFailed(
                    "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                if scope["path"] in COUNTED_PATHS:
                    gateway.metrics.requests.labels(outcome_of(error)).inc()
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    config: GatewayConfig,
    *,
    embedder: Embedder | None = None,
    kubeconfig: str | None = None,
) -> FastAPI:
    """The gateway app. ``embedder`` reuses an already loaded model (tests load
    it once); ``kubeconfig`` is for EndpointSlice discovery out of a cluster."""
    gateway = Gateway(config, embedder=embedder, kubeconfig=kubeconfig)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        log.info("gateway for %s/%s serving %r", config.namespace, config.deployment, config.served_model_name)
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="spotrag gateway",
        summary="OpenAI-compatible, retrieval-augmented chat in front of vLLM engines.",
        lifespan=lifespan,
        max_body_size=config.admission.max_body_bytes,
    )
    app.state.gateway = gateway
    app.state.started_at = int(time.time())
    app.add_middleware(APIKeyGuard)

    def count_error(request: Request, error: Exception) -> None:
        if request.url.path in COUNTED_PATHS:
            gateway.metrics.requests.labels(outcome_of(error)).inc()

    install_error_handlers(app, on_error=count_error)
    app.include_router(chat.router)
    app.include_router(rag.router)
    app.include_router(system.router)
    return app
