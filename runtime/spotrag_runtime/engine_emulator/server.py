"""The HTTP server: vLLM's OpenAI endpoints over the emulated engine.

Starlette under uvicorn: routing and JSON from Starlette, and a small ASGI
response of our own for generation, which streams and watches for the
client going away at the same time (so a disconnect frees the batch slot
even while the request is still queued).

Lifecycle, as measured on vLLM 0.26.0 (tests/data/vllm-0.26.0/):

* Loading: the socket is bound but not listening, so connections are
  *refused* (there is no 503 phase); ``/health`` answers 200 from then on.
* SIGTERM: within ~0.1 s the server stops listening and closes idle
  connections: new requests, ``/health`` and ``/metrics`` are refused.
  Running requests go on, per ``--shutdown-timeout N``:

  - N = 0: they are aborted at once; a stream gets a last chunk with
    ``finish_reason: "abort"``, its usage and ``[DONE]``.
  - they finish within N: they complete, and the process exits 0.
  - N runs out first: the engine stops. An open stream gets no more bytes
    (no finish_reason, no ``[DONE]``) and its connection stays open; the
    process exits only once its client drops the connection (or SIGKILL).

A second SIGTERM stops waiting for connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from types import FrameType

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import text
from .cli import cli  # noqa: F401  `spotrag engine-emulator` is dispatched to server:cli
from .config import EMULATED_VLLM_VERSION, EmulatorConfig
from .engine import Engine, Sequence
from .metrics import EngineMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    StreamFormatter,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    chat_completion_body,
    completion_body,
    new_request_id,
    parse_json_body,
    parse_request,
)

# uvicorn's general logger, so our lines share its format and level.
LOG = logging.getLogger("uvicorn.error")


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"


class EmulatedEngineServer:
    """Everything the routes share: settings, the engine, metrics, the phase."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.metrics = EngineMetrics(config)
        self.engine = Engine(config, self.metrics)
        self.metrics.bind(self.engine)
        self.phase = Phase.SERVING
        self.asleep = False  # sleep mode: weights offloaded, KV cache freed
        self.slept_before = False

    def require_awake(self) -> None:
        if self.asleep:
            # Not observed on the real server (spotrag never routes to a sleeping engine).
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "The engine is sleeping; POST /wake_up first.")

    def require_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(
                HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", err_type="NotFoundError", param="model"
            )

    def output_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """vLLM's length checks, with its messages; returns the max new tokens."""
        max_model_len = self.config.max_model_len
        if max_tokens is not None and max_tokens > max_model_len:
            raise APIError(
                HTTPStatus.BAD_REQUEST,
                f"max_tokens={max_tokens} cannot be greater than max_model_len=max_total_tokens={max_model_len}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                param="max_tokens",
            )
        requested = 1 if max_tokens is None else max_tokens
        if prompt_tokens + requested > max_model_len:
            # vLLM tokenizes a prompt only up to what could fit, hence "at least".
            counted = min(prompt_tokens, max_model_len - requested + 1)
            raise APIError(
                HTTPStatus.BAD_REQUEST,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{requested} output tokens and your prompt contains at least {counted} input tokens, for a "
                f"total of at least {counted + requested} tokens. Please reduce the length of the input prompt "
                f"or the number of requested output tokens. (parameter=input_tokens, value={counted})",
                param="input_tokens",
            )
        return max_model_len - prompt_tokens if max_tokens is None else max_tokens


class GenerationResponse:
    """Runs one request through the engine and answers it, streamed or whole.

    A watcher reads the ASGI receive channel for the client's disconnect and
    aborts the request at once, whether it is queued, prefilling or decoding.
    """

    def __init__(
        self,
        server: EmulatedEngineServer,
        seq: Sequence,
        *,
        chat: bool,
        request_id: str,
        include_usage: bool,
        continuous_usage: bool,
    ) -> None:
        self.server = server
        self.seq = seq
        self.chat = chat
        self.request_id = request_id
        self.include_usage = include_usage
        self.formatter = StreamFormatter(
            chat=chat,
            request_id=request_id,
            model=server.config.served_model_name,
            prompt_tokens=seq.prompt_tokens,
            continuous_usage=continuous_usage,
        )
        self.client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.server.engine
        engine.add(self.seq)
        watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            if self.seq.streaming:
                await self._stream(send)
            else:
                await self._respond(scope, receive, send)
        finally:
            watcher.cancel()
            engine.abort(self.seq)  # no-op once finished; frees the slot if we were cancelled

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                self.server.engine.abort(self.seq)
                return

    async def _stream(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
            }
        )
        formatter, seq = self.formatter, self.seq
        role_sent = not self.chat
        while True:
            delta, finish_reason = await seq.next_output()
            if finish_reason == "abort" and self.client_gone:
                return  # nobody to tell
            events = []
            if not role_sent:
                events.append(formatter.role())
                role_sent = True
            events.append(formatter.delta(delta, finish_reason, seq.generated))
            if finish_reason is not None:
                if self.include_usage:
                    events.append(formatter.final_usage(seq.generated))
                events.append(StreamFormatter.DONE)
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": finish_reason is None})
            if finish_reason is not None:
                return

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        generated, finish_reason = await self.seq.result()
        if finish_reason == "abort" and self.client_gone:
            return
        build = chat_completion_body if self.chat else completion_body
        body = build(
            request_id=self.request_id,
            model=self.server.config.served_model_name,
            text=generated,
            finish_reason=finish_reason,
            prompt_tokens=self.seq.prompt_tokens,
            completion_tokens=self.seq.generated,
        )
        await JSONResponse(body)(scope, receive, send)


def _server(request: Request) -> EmulatedEngineServer:
    return request.app.state.emulator


async def chat_completions(request: Request) -> GenerationResponse:
    server = _server(request)
    server.require_awake()
    body: ChatCompletionRequest = parse_request(ChatCompletionRequest, parse_json_body(await request.body()))
    server.require_model(body.model)
    messages = [message.to_message() for message in body.messages]
    prompt = text.render_chat(
        messages, add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message
    )
    prompt_tokens = text.count_tokens(prompt)
    max_new_tokens = server.output_budget(prompt_tokens, body.requested_max_tokens)
    config = server.config
    continuation = text.chat_answer(
        messages,
        seed=config.seed,
        answer_words=(config.answer_words_min, config.answer_words_max),
        continue_final_message=body.continue_final_message,
    )
    return _generation(
        server,
        body,
        prompt_tokens,
        max_new_tokens,
        continuation,
        chat=True,
        request_id=new_request_id("chatcmpl", body.request_id or request.headers.get("x-request-id")),
    )


async def completions(request: Request) -> GenerationResponse:
    server = _server(request)
    server.require_awake()
    body: CompletionRequest = parse_request(CompletionRequest, parse_json_body(await request.body()))
    server.require_model(body.model)
    prompt = body.prompt_text
    prompt_tokens = text.count_tokens(prompt)
    max_new_tokens = server.output_budget(prompt_tokens, body.requested_max_tokens)
    config = server.config
    continuation = text.answer(
        seed=config.seed,
        key=prompt,
        prompt_text=prompt,
        answer_words=(config.answer_words_min, config.answer_words_max),
    )
    return _generation(
        server,
        body,
        prompt_tokens,
        max_new_tokens,
        continuation,
        chat=False,
        request_id=new_request_id("cmpl", body.request_id or request.headers.get("x-request-id")),
    )


def _generation(
    server: EmulatedEngineServer,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    max_new_tokens: int,
    continuation: text.Continuation,
    *,
    chat: bool,
    request_id: str,
) -> GenerationResponse:
    seq = Sequence(
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        deltas=continuation.deltas,
        natural_remaining=continuation.natural_remaining,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        streaming=body.stream,
    )
    return GenerationResponse(
        server,
        seq,
        chat=chat,
        request_id=request_id,
        include_usage=body.include_usage,
        continuous_usage=body.continuous_usage,
    )


async def tokenize(request: Request) -> JSONResponse:
    server = _server(request)
    payload = parse_json_body(await request.body())
    if isinstance(payload, dict) and "messages" in payload:
        chat: TokenizeChatRequest = parse_request(TokenizeChatRequest, payload)
        server.require_model(chat.model)
        prompt = text.render_chat(
            [m.to_message() for m in chat.messages],
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
        )
        want_strs = chat.return_token_strs
    else:
        plain: TokenizeCompletionRequest = parse_request(TokenizeCompletionRequest, payload)
        server.require_model(plain.model)
        prompt, want_strs = plain.prompt, plain.return_token_strs
    ids = text.token_ids(prompt)
    return JSONResponse(
        {
            "count": len(ids),
            "max_model_len": server.config.max_model_len,
            "tokens": ids,
            "token_strs": text.token_strs(prompt) if want_strs else None,
        }
    )


async def models(request: Request) -> JSONResponse:
    config = _server(request).config
    created = int(request.app.state.started_at)
    permission = {
        "id": f"modelperm-{request.app.state.permission_id}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": config.served_model_name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        # vLLM's root is the model path; the emulator has none, so it names the model.
        "root": config.served_model_name,
        "parent": None,
        "max_model_len": config.max_model_len,
        "permission": [permission],
    }
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    # Never 503: a server that answers is ready (loading and draining refuse connections).
    return Response(status_code=200)


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": EMULATED_VLLM_VERSION})


async def load(request: Request) -> JSONResponse:
    engine = _server(request).engine
    return JSONResponse({"server_load": engine.num_running + engine.num_waiting})


async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def sleep(request: Request) -> Response:
    """vLLM's dev-mode POST /sleep?level=1: offload the weights, free the KV cache
    (level 2 drops the weights too). Running requests are aborted first."""
    server = _server(request)
    level = request.query_params.get("level", "1")
    if level not in ("1", "2"):
        raise APIError(HTTPStatus.BAD_REQUEST, f"sleep level must be 1 or 2, got {level!r}", param="level")
    if not server.asleep:
        server.engine.abort_all()
        # The time the real server takes (not a sync): the first sleep copies the weights out.
        await asyncio.sleep(server.config.resleep_seconds if server.slept_before else server.config.sleep_seconds)
        server.asleep = server.slept_before = True
    return Response(status_code=200)


async def wake_up(request: Request) -> Response:
    server = _server(request)
    if server.config.wake_fails:
        raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, "wake_up failed: CUDA error: out of memory")
    if server.asleep:
        await asyncio.sleep(server.config.wake_seconds)
        server.asleep = False
    return Response(status_code=200)


async def is_sleeping(request: Request) -> JSONResponse:
    return JSONResponse({"is_sleeping": _server(request).asleep})


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # vLLM is FastAPI: an unknown path or method gets FastAPI's {"detail": ...}, not the envelope.
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(config: EmulatorConfig) -> Starlette:
    server = EmulatedEngineServer(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.started_at = time.time()
        app.state.permission_id = uuid.uuid4().hex[:16]
        yield
        server.engine.abort_all()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET"]),
        Route("/load", load, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if config.enable_sleep_mode:
        routes += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
        ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={APIError: _api_error, HTTPException: _http_error}
    )
    app.state.emulator = server
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM turned into vLLM 0.26's drain (see the module doc)."""

    def __init__(self, config: uvicorn.Config, emulator: EmulatedEngineServer) -> None:
        super().__init__(config)
        self.emulator = emulator
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.loop is not None:
            if self.drain_task is None and not self.should_exit:
                self.loop.call_soon_threadsafe(self._start_drain)
            else:
                self.force_exit = True  # a second SIGTERM: stop waiting for connections
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain())
            # uvicorn's next tick (<= 0.1 s, as in vLLM) stops listening and closes
            # idle connections, then waits for the open ones without a time limit.
            self.should_exit = True

    async def _drain(self) -> None:
        emulator, engine = self.emulator, self.emulator.engine
        emulator.phase = Phase.DRAINING
        timeout = emulator.config.shutdown_timeout
        LOG.info(
            "SIGTERM: draining %d running and %d waiting requests for up to %.1fs",
            engine.num_running,
            engine.num_waiting,
            timeout,
        )
        if timeout <= 0:
            engine.abort_all(last_step=True)  # streams end with finish_reason "abort"
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.wait_idle(), timeout)
        if engine.num_running or engine.num_waiting:
            LOG.warning(
                "shutdown timeout over: the engine stops with %d running and %d waiting requests; "
                "waiting for their connections to close",
                engine.num_running,
                engine.num_waiting,
            )
            engine.stop()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def listening_socket(config: EmulatorConfig) -> socket.socket:
    """The socket to serve on, bound but not listening: connections are refused
    until the model is "loaded" and uvicorn listens."""
    if config.fd is not None:
        return socket.socket(fileno=config.fd)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    return sock


def serve(config: EmulatorConfig) -> int:
    disable_created_metrics()
    app = create_app(config)
    sock = listening_socket(config)
    host, port = sock.getsockname()[:2]
    if config.startup_delay > 0:
        print(f"engine-emulator: loading for {config.startup_delay:g}s", file=sys.stderr, flush=True)
        time.sleep(config.startup_delay)  # the emulated model load: not listening yet
    uvicorn_config = uvicorn.Config(
        app, log_level=config.log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=None
    )
    server = _DrainingServer(uvicorn_config, app.state.emulator)
    print(f"engine-emulator: serving {config.served_model_name!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
