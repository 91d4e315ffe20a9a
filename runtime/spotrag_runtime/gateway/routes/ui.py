"""The chat page (``ui.path``, ``/`` by default): a static page and a small
script, served from ``gateway/static/`` as they are (no build step). The page
talks to the gateway's own API like any client, streaming ``/v1/rag/query``
(the passages first, then the answer), so an API key works the same way for
it; the key stays in the browser. See docs/gateway.md, "The chat page".

Its assets and settings live under ``{path}/_ui/``: ``app.js``, ``style.css``
and ``config.json`` (what the page needs before its first question: the model
name, the limits it checks before sending, whether a key is needed). None of
it needs a key: it holds nothing the API does not already tell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from spotrag_runtime.gateway.config import GatewayConfig
from spotrag_runtime.gateway.errors import NotFound
from spotrag_runtime.gateway.service import Gateway

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own script and style and talks only to its gateway.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_config(gateway: Gateway) -> dict[str, Any]:
    config = gateway.config
    return {
        "model": config.served_model_name,
        "deployment": config.deployment,
        "retrieval": gateway.retrieval is not None,
        "topK": config.retrieval.top_k,
        "maxTokensLimit": config.max_tokens_limit,
        "defaultMaxTokens": config.default_max_tokens,
        "maxBodyBytes": config.admission.max_body_bytes,
        "auth": gateway.auth is not None,
    }


def ui_router(config: GatewayConfig) -> APIRouter:
    """The page's routes at ``config.ui.path``."""
    router = APIRouter(include_in_schema=False)
    base = config.ui.path.rstrip("/")
    assets = f"{base}/_ui"
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("{{ASSETS}}", assets)

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=HEADERS)

    for path in {config.ui.path, base or "/", f"{base}/"}:
        router.add_api_route(path, index, methods=["GET"])

    @router.get(f"{assets}/config.json")
    async def settings(request: Request) -> JSONResponse:
        return JSONResponse(page_config(request.app.state.gateway), headers=HEADERS)

    @router.get(assets + "/{name}")
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise NotFound(f"No such file: {name}.")
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=HEADERS)

    return router
