"""Real parts for the gateway tests: the shipped MiniLM model, a faiss index of
the bundled corpus, engine emulator processes, and the gateway served by
uvicorn on 127.0.0.1 in a thread.

Expensive things (the model, the corpus index) are made once per test
process, however many test modules use them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from spotrag_box.testing import eventually, scrape, scrape_async
from spotrag_runtime.engine_emulator import EmulatorProcess, start_engine_emulator
from spotrag_runtime.gateway import GatewayConfig
from spotrag_runtime.gateway.app import create_app
from spotrag_runtime.index import SAMPLE_CORPUS_DIR, build_index, load_sample_questions
from spotrag_runtime.retrieval import DEFAULT_MODEL, Embedder, set_torch_threads

SERVED_MODEL = "hfl-assistant"
API_KEY = "sk-test-key-1"


@functools.cache
def shared_embedder() -> Embedder:
    set_torch_threads(1)
    return Embedder(DEFAULT_MODEL, device="cpu")


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def corpus_index() -> Path:
    """The bundled ferry-line corpus, indexed once per test process."""
    root = scratch_dir("spotrag-gateway-index-") / "index"
    build_index([SAMPLE_CORPUS_DIR], root, embedder=shared_embedder())
    return root


def sample_questions() -> list[Any]:
    return load_sample_questions()


def gateway_config(engine_urls: list[str] = (), **sections: dict[str, Any]) -> GatewayConfig:
    """A config as the operator would render it, pointing at the corpus index and the engines."""
    retrieval_on = sections.get("retrieval", {}).get("enabled", True)
    mapping: dict[str, Any] = {
        "deployment": "test",
        "servedModelName": SERVED_MODEL,
        "maxModelLen": 8192,
        # The corpus index is built only for a gateway that retrieves.
        "retrieval": {
            "indexPath": str(corpus_index()) if retrieval_on else "/nonexistent",
            "reloadIntervalSeconds": 0.2,
        },
        "engines": {"discovery": "static", "urls": list(engine_urls)},
        "failover": {"engineCooldownSeconds": 0.5, "readTimeoutSeconds": 10},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            mapping.setdefault(section, {}).update(values)
        else:
            mapping[section] = values
    return GatewayConfig.from_mapping(mapping)


class RunningGateway:
    """The gateway app served by uvicorn on a free 127.0.0.1 port in a thread."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        kubeconfig: str | None = None,
        with_embedder: bool = True,
        send_buffer: int | None = None,
    ) -> None:
        """``send_buffer``: the kernel's send buffer of every client connection, in bytes (a small one
        lets a test fill it)."""
        embedder = shared_embedder() if config.retrieval.enabled and with_embedder else None
        self.config = config
        self.app = create_app(config, embedder=embedder, kubeconfig=kubeconfig)
        self._socket = socket.socket()
        if send_buffer is not None:
            # Set on the listening socket, the accepted connections inherit it (Linux).
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="gateway-under-test"
        )

    @property
    def gateway(self):
        return self.app.state.gateway

    def start(self) -> RunningGateway:
        self._thread.start()
        eventually(lambda: self._server.started or not self._thread.is_alive(), what="the gateway to start", timeout=60)
        if not self._server.started:
            raise RuntimeError("the gateway did not start; see the log above")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> RunningGateway:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self, **options: Any) -> openai.OpenAI:
        # No retries: every test sees exactly what the gateway answered.
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=options.pop("api_key", API_KEY), max_retries=0, **options
        )

    def metric(self, name: str, **labels: str) -> float:
        return scrape(f"{self.url}/metrics").value(name, **labels)

    async def metric_async(self, name: str, **labels: str) -> float:
        return (await scrape_async(f"{self.url}/metrics")).value(name, **labels)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=options.pop("api_key", API_KEY), max_retries=0, **options
        )


@contextlib.contextmanager
def running_engines(count: int, **options: Any) -> Iterator[list[EmulatorProcess]]:
    """``count`` engine emulators serving SERVED_MODEL with the same seed (so
    they write the same answers), stopped at the end."""
    options = {"served_model_name": SERVED_MODEL, "seed": 7, **options}
    engines = [start_engine_emulator(**options) for _ in range(count)]
    try:
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.kill()
            engine.stop()


def tokenize_count(engine: EmulatorProcess, messages: list[dict[str, Any]]) -> int:
    """What the engine counts for a chat prompt (the gateway's definition too)."""
    response = httpx.post(f"{engine.url}/tokenize", json={"model": SERVED_MODEL, "messages": messages}, timeout=5)
    response.raise_for_status()
    return response.json()["count"]


def direct_answer(engine: EmulatorProcess, messages: list[dict[str, Any]], **params: Any) -> str:
    """The answer one engine gives, asked directly."""
    with openai.OpenAI(base_url=f"{engine.url}/v1", api_key="none", max_retries=0) as client:
        completion = client.chat.completions.create(model=SERVED_MODEL, messages=messages, **params)
    return completion.choices[0].message.content or ""
