"""Models, health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spotrag_runtime.gateway.errors import Unavailable
from spotrag_runtime.gateway.service import Gateway

router = APIRouter()


def _model_card(gateway: Gateway, started_at: int) -> dict[str, Any]:
    return {"id": gateway.config.served_model_name, "object": "model", "created": started_at, "owned_by": "spotrag"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    return {"object": "list", "data": [_model_card(gateway, request.app.state.started_at)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    gateway.check_model(model)
    return _model_card(gateway, request.app.state.started_at)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    problems = gateway.readiness()
    if problems:
        raise Unavailable("Not ready: " + "; ".join(problems) + ".", code="not_ready")
    return {"status": "ready", "engines": len(gateway.admission.engines)}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
