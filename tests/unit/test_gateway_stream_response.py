"""The streamed answer's response (``ChatStream``) over real HTTP, against the
gateway served by uvicorn: the relay is closed as soon as the client goes away
(before the first chunk, during the keep-alive comments, mid-answer), errors
keep their status before the stream starts and go inside it after, and a
client that disconnects from a stalled engine frees the engine's slot and its
queued tokens without waiting for the next token.

Most tests put a scripted relay in place of the engines, fed from the test
one chunk at a time, so every step happens when the test says and nothing
waits on a clock.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from spotrag_box.testing import eventually, scrape
from spotrag_runtime.gateway.errors import EnginesFailed, QueueFull, Unavailable
from spotrag_runtime.gateway.relay import ChatJob, ChatOutcome, ClientSink
from spotrag_runtime.gateway.routes.streaming import ClientWriter, sse

from .gateway_fixtures import API_KEY, SERVED_MODEL, RunningGateway, direct_answer, gateway_config, running_engines

QUESTION = [{"role": "user", "content": "When does the night ferry leave?"}]
BODY = {"model": SERVED_MODEL, "messages": QUESTION, "max_tokens": 50, "stream": True}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WAIT = 15.0  # a bound, not a measurement: every wait here ends as soon as its event happens


class ScriptedRelay:
    """Stands in for ``gateway.relay.answer``: writes the chunks the test
    feeds it (``feed``) to the client, raises what it is fed, and notes when
    the gateway starts it and when it ends (or is cancelled)."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._early: list[str | BaseException | None] = []  # fed before the gateway read the relay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None

    async def answer(self, job: ChatJob, outcome: ChatOutcome, sink: ClientSink | None = None) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), queue
            for item in self._early:
                queue.put_nowait(item)
        self.reading.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    outcome.finish_reason = "stop"
                    return
                outcome.pieces.append(item)
                outcome.generated += 1
                if sink is not None:
                    sink.write([sse(_chunk(job, item))])
        finally:
            self.closed.set()

    def feed(self, item: str | BaseException | None) -> None:
        """A chunk of text, an error to raise, or None for the end (kept until the gateway reads the relay)."""
        with self._lock:
            if self._loop is None:
                self._early.append(item)
                return
            loop, queue = self._loop, self._queue
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _chunk(job: ChatJob, text: str) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.served_model,
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }


@pytest.fixture
def scripted() -> Iterator[tuple[RunningGateway, ScriptedRelay]]:
    yield from _scripted(keep_alive=60)


@pytest.fixture
def scripted_keep_alive() -> Iterator[tuple[RunningGateway, ScriptedRelay]]:
    """Keep-alive comments right away: the first comment is the test's cue that the stream started."""
    yield from _scripted(keep_alive=0.01)


def _scripted(keep_alive: float) -> Iterator[tuple[RunningGateway, ScriptedRelay]]:
    config = gateway_config(
        retrieval={"enabled": False}, admission={"keepAliveSeconds": keep_alive, "tokenCounting": "estimate"}
    )
    with RunningGateway(config) as gateway:
        relay = ScriptedRelay()
        gateway.gateway.relay.answer = relay.answer
        yield gateway, relay


def events(response: httpx.Response) -> Iterator[str]:
    """The lines of an event stream that carry something (data and comments).
    httpx closes the connection when a half-read iterator is dropped: a test
    that reads on keeps its iterator."""
    for line in response.iter_lines():
        if line:
            yield line


def data(line: str) -> dict | str:
    assert line.startswith("data: "), line
    payload = line[len("data: ") :]
    return payload if payload == "[DONE]" else json.loads(payload)


def counted(gateway: RunningGateway, outcome: str) -> float:
    return gateway.metric("spotrag_requests_total", outcome=outcome)


def test_an_answer_streams_whole_with_the_usual_headers(scripted) -> None:
    gateway, relay = scripted
    relay.feed("The night ferry")  # the response starts with the first chunk
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream_options": {"include_usage": True}}) as (
            response
        ):
            lines = events(response)
            first = data(next(lines))
            relay.feed(" leaves at ten.")
            relay.feed(None)
            rest = [data(line) for line in lines]
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert first["choices"][0]["delta"]["content"] == "The night ferry"
    assert rest[0]["choices"][0]["delta"]["content"] == " leaves at ten."
    assert rest[1]["choices"] == [] and rest[1]["usage"]["completion_tokens"] == 2
    assert rest[2:] == ["[DONE]"]
    assert relay.closed.is_set()
    eventually(lambda: counted(gateway, "success") == 1, what="the answer to be counted")


def test_a_client_that_disconnects_mid_answer_closes_the_relay_at_once(scripted) -> None:
    gateway, relay = scripted
    relay.feed("The night ferry")
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            assert data(next(events(response)))["choices"][0]["delta"]["content"] == "The night ferry"
        # Leaving the block closed the connection; the relay has nothing more to give, so
        # only noticing the disconnect itself can close it.
    assert relay.closed.wait(WAIT), "the relay was left open after the client went away"
    eventually(lambda: counted(gateway, "cancelled") == 1, what="the cancellation to be counted")
    assert counted(gateway, "success") == 0


def test_a_client_that_disconnects_before_the_first_chunk_closes_the_relay_at_once(scripted) -> None:
    gateway, relay = scripted
    request = json.dumps(BODY).encode()
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])), timeout=WAIT) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        assert relay.reading.wait(WAIT), "the gateway never read the relay"
    assert relay.closed.wait(WAIT), "the relay was left open after the client went away"
    eventually(lambda: counted(gateway, "cancelled") == 1, what="the cancellation to be counted")


def test_a_client_that_disconnects_during_the_keep_alive_comments_closes_the_relay(scripted_keep_alive) -> None:
    gateway, relay = scripted_keep_alive
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            assert response.status_code == 200
            assert next(events(response)) == ": waiting for an engine"
    assert relay.closed.wait(WAIT), "the relay was left open after the client went away"
    eventually(lambda: counted(gateway, "cancelled") == 1, what="the cancellation to be counted")


@pytest.mark.parametrize(
    ("error", "status", "outcome"),
    [(QueueFull("The queue is full."), 429, "queue_full"), (Unavailable("No engine."), 503, "unavailable")],
)
def test_an_error_before_the_first_chunk_keeps_its_status(scripted, error, status, outcome) -> None:
    gateway, relay = scripted
    relay.feed(error)
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        response = http.post("/v1/chat/completions", json=BODY)
    assert response.status_code == status
    assert response.json()["error"]["message"] == error.message
    assert relay.closed.is_set()
    assert counted(gateway, outcome) == 1


@pytest.mark.parametrize(
    ("error", "message", "outcome"),
    [
        (EnginesFailed("Every engine failed."), "Every engine failed.", "engine_failed"),
        (RuntimeError("a bug"), "The gateway failed while streaming this answer; see its log.", "error"),
    ],
)
def test_an_error_inside_the_stream_is_its_last_event_and_closes_the_relay(scripted, error, message, outcome) -> None:
    gateway, relay = scripted
    relay.feed("The night ferry")
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            lines = events(response)
            assert data(next(lines))["choices"][0]["delta"]["content"] == "The night ferry"
            relay.feed(error)
            rest = [data(line) for line in lines]
    assert response.status_code == 200
    assert rest[0]["error"]["message"] == message
    assert rest[1:] == ["[DONE]"]
    assert relay.closed.is_set()
    eventually(lambda: counted(gateway, outcome) == 1, what="the failure to be counted")


def test_an_error_after_the_keep_alive_comments_goes_inside_the_stream(scripted_keep_alive) -> None:
    gateway, relay = scripted_keep_alive
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            lines = events(response)
            assert next(lines) == ": waiting for an engine"
            relay.feed(EnginesFailed("Every engine failed."))
            rest = [line for line in lines if not line.startswith(":")]
    assert response.status_code == 200
    assert data(rest[0])["error"]["code"] == "engines_failed"
    assert data(rest[1]) == "[DONE]" and len(rest) == 2
    assert relay.closed.is_set()
    eventually(lambda: counted(gateway, "engine_failed") == 1, what="the failure to be counted")


def test_the_first_chunk_after_the_keep_alive_comments_streams_on(scripted_keep_alive) -> None:
    gateway, relay = scripted_keep_alive
    with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
        with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            lines = events(response)
            assert next(lines) == ": waiting for an engine"
            relay.feed("The night ferry")
            relay.feed(None)
            rest = [data(line) for line in lines if not line.startswith(":")]
    assert response.status_code == 200
    assert rest[0]["choices"][0]["delta"]["content"] == "The night ferry"
    assert rest[1:] == ["[DONE]"]
    eventually(lambda: counted(gateway, "success") == 1, what="the answer to be counted")


def test_a_client_that_leaves_a_stalled_engine_frees_its_slot_and_queued_tokens_at_once() -> None:
    # One token, then an engine that would take ten minutes for the next (and no
    # stall watch): only noticing the disconnect itself, not the next write, can
    # give the slot back in time. The admission state is read directly: the
    # gauges are published a quarter of a second late.
    with running_engines(1, ttft_ms=1, itl_ms=600_000) as (engine,):
        config = gateway_config(
            [engine.url], retrieval={"enabled": False}, failover={"stallTimeoutSeconds": 0, "readTimeoutSeconds": 900}
        )
        with RunningGateway(config) as gateway:
            admission = gateway.gateway.admission
            slot = admission.engines[engine.url]
            with httpx.Client(base_url=gateway.url, headers=HEADERS, timeout=WAIT) as http:
                with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
                    assert response.status_code == 200
                    lines = events(response)  # kept: dropping a half-read iterator closes the connection
                    while not (data(next(lines))["choices"] or [{}])[0]["delta"].get("content"):
                        pass  # the role chunk
                    assert admission.queued_tokens > 0
                    assert slot.inflight_requests == 1 and slot.inflight_tokens > 0
            eventually(lambda: admission.queued_tokens == 0, what="the queued tokens to be freed")
            assert slot.inflight_requests == 0 and slot.inflight_tokens == 0
            eventually(
                lambda: scrape(f"{engine.url}/metrics").value("vllm:num_requests_running") == 0,
                what="the engine to drop the request",
            )
            assert scrape(f"{engine.url}/metrics").value("vllm:request_success_total", finished_reason="abort") == 1
            eventually(lambda: counted(gateway, "cancelled") == 1, what="the cancellation to be counted")


def test_a_client_that_reads_slowly_pauses_its_engine_and_still_gets_the_whole_answer() -> None:
    # Small socket buffers at both ends, so the gateway's writes back up after a
    # few tens of kilobytes: the engine's stream is paused until the client reads
    # again, and that silence is not taken for a stall (the stall bound is 0.2 s,
    # the client stops reading for a second).
    body = {**BODY, "max_tokens": 1500, "ignore_eos": True}
    with running_engines(1, ttft_ms=1, itl_ms=1) as (engine,):
        config = gateway_config([engine.url], retrieval={"enabled": False}, failover={"stallTimeoutSeconds": 0.2})
        expected = direct_answer(engine, QUESTION, max_tokens=1500, extra_body={"ignore_eos": True})
        small_receive_buffer = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
        with RunningGateway(config, send_buffer=4096) as gateway:
            with httpx.Client(
                base_url=gateway.url, headers=HEADERS, timeout=WAIT, transport=small_receive_buffer
            ) as http:
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    eventually(
                        lambda: gateway.metric("spotrag_slow_client_pauses_total") >= 1,
                        what="the gateway to pause the engine for the client",
                    )
                    time.sleep(1.0)  # the client is slow: it reads nothing for a while (not a synchronisation)
                    chunks = [data(line) for line in events(response)]
            assert chunks[-1] == "[DONE]"
            text = "".join((chunk["choices"] or [{}])[0].get("delta", {}).get("content") or "" for chunk in chunks[:-1])
            assert text == expected
            assert gateway.metric("spotrag_stalled_streams_total") == 0
            assert gateway.metric("spotrag_resumed_streams_total") == 0


class FlowControlledSend:
    """An ASGI server's ``send`` as uvicorn's behaves: it returns at once while
    the client keeps up, and waits while ``paused`` (the socket buffer full)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def __call__(self, message: dict) -> None:
        await self.writable.wait()
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


def test_the_client_writer_queues_in_order_while_the_client_is_not_reading() -> None:
    async def scenario() -> None:
        send = FlowControlledSend()
        writer = ClientWriter(send, send, head=b"head;")
        writer.write([b"a;", b"b;"])  # starts the response: nothing waits, nothing blocks
        assert writer.blocked is None and send.body == b"head;a;b;"
        send.writable.clear()
        writer.write([b"c;"])  # waits for the client: held in a task
        blocked = writer.blocked
        assert blocked is not None
        writer.write([b"d;"])
        writer.write([b"e;"])
        assert send.body == b"head;a;b;"
        send.writable.set()
        await blocked
        assert writer.blocked is None
        await writer.finish(b"end")
        assert send.body == b"head;a;b;c;d;e;end"
        assert [m["type"] for m in send.messages] == ["http.response.start"] + ["http.response.body"] * 4
        assert send.messages[-1]["more_body"] is False

    asyncio.run(scenario())


def test_a_write_the_client_never_takes_is_cancelled_with_the_answer() -> None:
    async def scenario() -> None:
        send = FlowControlledSend()
        writer = ClientWriter(send, send)
        send.writable.clear()
        writer.write([b"a;"])  # the start itself waits
        blocked = writer.blocked
        assert blocked is not None
        writer.write([b"b;"])
        blocked.cancel()  # the client went away
        await asyncio.wait({blocked})
        assert writer.blocked is None and writer.queued == [] and send.messages == []

    asyncio.run(scenario())
