"""Helpers for the front door's tests: a moderation checker that speaks
OpenAI's moderation API over real HTTP (and one that never answers), and the
front door served by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import uvicorn
from aiohttp import web

from spotrag_runtime.frontdoor.app import create_app
from spotrag_runtime.frontdoor.config import FrontDoorConfig


@contextlib.asynccontextmanager
async def moderation_checker(flag_words: tuple[str, ...] = (), *, hang: bool = False) -> AsyncIterator[dict[str, Any]]:
    """``POST /v1/moderations`` flagging inputs that hold any of ``flag_words``
    (category "violence"); with ``hang``, it accepts and never answers. Yields
    {"url": base URL, "inputs": what it was asked}."""
    state: dict[str, Any] = {"inputs": []}
    never = asyncio.Event()

    async def moderations(request: web.Request) -> web.Response:
        body = await request.json()
        state["inputs"].append(body["input"])
        if hang:
            await never.wait()
        flagged = any(word in body["input"] for word in flag_words)
        result = {"flagged": flagged, "categories": {"violence": flagged, "hate": False}, "category_scores": {}}
        return web.json_response({"id": "modr-1", "model": body.get("model", "m"), "results": [result]})

    app = web.Application()
    app.router.add_post("/v1/moderations", moderations)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        never.set()
        await runner.cleanup()


class RunningFrontDoor:
    """The front door app served by uvicorn on a free 127.0.0.1 port in a thread."""

    def __init__(self, config: FrontDoorConfig, *, kubeconfig: str | None = None) -> None:
        self.app = create_app(config, kubeconfig=kubeconfig)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="frontdoor-under-test"
        )

    @property
    def frontdoor(self):
        return self.app.state.frontdoor

    def __enter__(self) -> RunningFrontDoor:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the front door did not start; see the log above")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options
        )
