"""``EngineClient``'s own HTTP/1.1 to an engine (gateway/upstream.py), over
real sockets: the request it sends, Server-Sent Events cut at awkward places,
one batch per network read, keep-alive reuse, and which failure class each way
of failing ends in (EngineRejected: another engine would refuse too;
EngineFailure: try another; EngineRefused: nothing was served).

Why a scripted server rather than the engine emulator: what is under test is
how the bytes arrive (split mid-line or mid-chunk-size, several events in one
read, a connection closed before, during or instead of an answer), and a real
server decides that itself. Here each test writes the exact bytes, and writes
the next only once the client has handled the last (the receiver got its
batch, or the request was read), so every network read the client makes is
one the test chose and nothing waits on a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from spotrag_runtime.gateway.errors import EngineRejected
from spotrag_runtime.gateway.upstream import EngineClient, EngineFailure, EngineRefused, EngineStream

T = TypeVar("T")
WAIT = 10.0  # a bound against a hang, not a measurement: every wait ends as soon as its event happens

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Où part le ferry de nuit ?"}], "stream": True}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def chunk_event(word: str) -> bytes:
    """A chat chunk's JSON as vLLM writes it (it begins with ``{"id":``)."""
    return (
        b'{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"tiny",'
        b'"choices":[{"index":0,"delta":{"content":"' + word.encode() + b'"},"finish_reason":null}]}'
    )


E1, E2, E3, E4 = (chunk_event(word) for word in ("The", " ferry", " leaves", " at"))


def error_event(code: int) -> bytes:
    return json.dumps({"error": {"message": "boom", "type": "BadRequestError", "code": code}}).encode()


def sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + event + b"\n\n" for event in events)


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def stream_response(*events: bytes) -> bytes:
    """A whole streamed answer, ``[DONE]`` and the last chunk included."""
    return STREAM_HEAD + chunked(sse(*events) + DONE) + LAST_CHUNK


def json_response(status: int, body: dict, *, extra_headers: bytes = b"") -> bytes:
    content = json.dumps(body).encode()
    return (
        b"HTTP/1.1 %d Whatever\r\nserver: uvicorn\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
        % (status, len(content), extra_headers, content)
    )


def openai_error(message: str, code: int) -> dict:
    """An error body as vLLM 0.26 answers it (tests/data/vllm-0.26.0/runA/err_*.txt)."""
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": code}}


async def bounded(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT):
        return await awaitable


@dataclass
class Request:
    line: str
    headers: dict[str, str]  # names in lower case
    body: bytes


class Peer:
    """The engine's end of one connection the client opened."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> Request:
        head = await bounded(self.reader.readuntil(b"\r\n\r\n"))
        line, *fields = head.decode().removesuffix("\r\n\r\n").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (f.split(":", 1) for f in fields)}
        body = await bounded(self.reader.readexactly(int(headers["content-length"])))
        return Request(line, headers, body)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await bounded(self.writer.drain())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await bounded(self.writer.wait_closed())

    async def sees_eof(self) -> bool:
        return await bounded(self.reader.read()) == b""


class ScriptedEngine:
    """A TCP server on 127.0.0.1 that answers nothing by itself: the test
    takes each connection (``accept``) and says what is written on it."""

    def __init__(self) -> None:
        self.connections: list[Peer] = []
        self._new: asyncio.Queue[Peer] = asyncio.Queue()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for peer in self.connections:
            await peer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.connections.append(peer)
        self._new.put_nowait(peer)

    async def accept(self) -> Peer:
        return await bounded(self._new.get())


class Receiver:
    """A StreamReceiver that keeps every batch and what ended the stream."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.ends: list[Exception | None] = []
        self._arrived: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self._ended = asyncio.Event()

    def events(self, batch: list[bytes]) -> None:
        self.batches.append(list(batch))
        self._arrived.put_nowait(list(batch))

    def ended(self, error: Exception | None) -> None:
        self.ends.append(error)
        self._ended.set()

    async def next_batch(self) -> list[bytes]:
        return await bounded(self._arrived.get())

    async def end(self) -> Exception | None:
        """What ended the stream (None for ``[DONE]``); it must end once."""
        await bounded(self._ended.wait())
        assert len(self.ends) == 1, self.ends
        return self.ends[0]


@dataclass
class Chat:
    stream: EngineStream
    receiver: Receiver
    peer: Peer
    request: Request


@pytest.fixture
async def client() -> AsyncIterator[EngineClient]:
    client = EngineClient(connect_timeout=WAIT, read_timeout=WAIT)
    yield client
    await client.aclose()


@pytest.fixture
async def engine(client: EngineClient) -> AsyncIterator[ScriptedEngine]:
    # Needs ``client`` so that it stops first: the client's connections see the engine close them.
    engine = ScriptedEngine()
    await engine.start()
    yield engine
    await engine.stop()


async def start_chat(client: EngineClient, engine: ScriptedEngine, *, on: Peer | None = None) -> Chat:
    """A chat stream whose request the engine has read, on a new connection or on ``on``."""
    receiver = Receiver()
    stream = await client.stream_chat(engine.url, CHAT, receiver)
    peer = on or await engine.accept()
    return Chat(stream, receiver, peer, await peer.read_request())


async def end_of_answer(client: EngineClient, engine: ScriptedEngine, response: bytes) -> Exception | None:
    """How a chat stream ends when the engine writes ``response`` at once."""
    chat = await start_chat(client, engine)
    await chat.peer.write(response)
    return await chat.receiver.end()


def assert_failure(error: Exception | None, words: str) -> None:
    """A failure another engine may not have, but not a refusal: the request reached this one."""
    assert isinstance(error, EngineFailure) and not isinstance(error, EngineRefused), repr(error)
    assert words in str(error)


async def test_a_chat_request_is_one_post_of_its_json_body_with_host_type_and_length(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    assert chat.request.line == "POST /v1/chat/completions HTTP/1.1"
    assert chat.request.headers["host"] == f"127.0.0.1:{engine.port}"
    assert chat.request.headers["content-type"] == "application/json"
    # The body was read by its Content-Length (in bytes: the question is not ASCII), so it parses only if that is right.
    assert json.loads(chat.request.body) == CHAT


async def test_events_cut_mid_line_mid_chunk_size_and_across_writes_come_whole_and_in_order(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    # E2 begins in one chunk and ends in the next; the "data:" before E4 too.
    first = sse(E1) + b"data: " + E2[:20]
    second = E2[20:] + b"\n\n" + sse(E3) + b"da"
    third = b"ta: " + E4 + b"\n\n" + DONE
    wire = STREAM_HEAD + chunked(first) + chunked(second) + chunked(third) + LAST_CHUNK
    mid_chunk_size = wire.index(chunked(second)) + 1  # between the two hex digits of the second chunk's size
    mid_event = wire.index(E4) + 10  # inside E4, inside the third chunk
    assert len(second) > 0xF
    writes = [wire[:mid_chunk_size], wire[mid_chunk_size:mid_event], wire[mid_event:]]

    chat = await start_chat(client, engine)
    for write, events in zip(writes, [[E1], [E2, E3], [E4]], strict=True):
        await chat.peer.write(write)
        assert await chat.receiver.next_batch() == events  # so the next write is a read of its own
    assert await chat.receiver.end() is None
    assert chat.receiver.batches == [[E1], [E2, E3], [E4]]


async def test_events_that_come_in_one_read_are_handed_on_as_one_batch(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    await chat.peer.write(STREAM_HEAD + chunked(sse(E1)) + chunked(sse(E2, E3)) + chunked(sse(E4) + DONE) + LAST_CHUNK)
    assert await chat.receiver.end() is None
    assert chat.receiver.batches == [[E1, E2, E3, E4]]


async def test_a_connection_is_reused_for_the_next_request_once_its_answer_is_complete(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    first = await start_chat(client, engine)
    await first.peer.write(stream_response(E1))
    assert await first.receiver.end() is None

    second = await start_chat(client, engine, on=first.peer)
    assert len(engine.connections) == 1
    await second.peer.write(stream_response(E2))
    assert await second.receiver.end() is None
    assert (first.receiver.batches, second.receiver.batches) == ([[E1]], [[E2]])


async def test_a_body_that_ends_without_done_is_a_failure(client: EngineClient, engine: ScriptedEngine) -> None:
    error = await end_of_answer(client, engine, STREAM_HEAD + chunked(sse(E1)) + LAST_CHUNK)
    assert_failure(error, "without [DONE]")


async def test_a_4xx_answer_is_rejected_with_the_engines_message_and_status(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    message = "This model's maximum context length is 2048 tokens."
    response = json_response(400, openai_error(message, 400), extra_headers=b"connection: close\r\n")
    error = await end_of_answer(client, engine, response)
    assert isinstance(error, EngineRejected), repr(error)
    assert error.status == 400
    assert message in error.message


@pytest.mark.parametrize("status", [503, 429])
async def test_a_503_or_429_answer_is_a_failure_that_another_engine_may_not_have(
    client: EngineClient, engine: ScriptedEngine, status: int
) -> None:
    error = await end_of_answer(client, engine, json_response(status, openai_error("overloaded", status)))
    assert_failure(error, f"answered {status}")


async def test_a_connection_closed_after_the_request_without_an_answer_is_refused(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    await chat.peer.close()
    assert isinstance(await chat.receiver.end(), EngineRefused)


async def test_a_connection_closed_mid_body_is_a_failure_not_a_refusal(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    # The chunk says it holds two events; only the first comes before the close.
    await chat.peer.write(STREAM_HEAD + b"%x\r\n" % len(sse(E1, E2)) + sse(E1))
    assert await chat.receiver.next_batch() == [E1]
    await chat.peer.close()
    assert_failure(await chat.receiver.end(), "mid-response")


async def test_a_port_where_nothing_listens_raises_refused_from_stream_chat(client: EngineClient) -> None:
    with socket.socket() as bound_not_listening:  # holds the port, so connections to it are refused
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        receiver = Receiver()
        with pytest.raises(EngineRefused):
            await client.stream_chat(f"http://127.0.0.1:{port}", CHAT, receiver)
    assert (receiver.batches, receiver.ends) == ([], [])


async def mid_stream_error(client: EngineClient, engine: ScriptedEngine, code: int) -> Chat:
    """A stream that sends E1, then an error event, then ends as vLLM ends it."""
    chat = await start_chat(client, engine)
    await chat.peer.write(STREAM_HEAD + chunked(sse(E1)))
    assert await chat.receiver.next_batch() == [E1]
    await chat.peer.write(chunked(sse(error_event(code)) + DONE) + LAST_CHUNK)
    return chat


async def test_an_error_event_with_a_4xx_code_mid_stream_is_rejected_with_that_status(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await mid_stream_error(client, engine, 400)
    error = await chat.receiver.end()
    assert isinstance(error, EngineRejected), repr(error)
    assert error.status == 400
    assert "boom" in error.message
    assert chat.receiver.batches == [[E1]]  # the error event is not passed on as an event


async def test_an_error_event_with_a_5xx_code_mid_stream_is_a_failure(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await mid_stream_error(client, engine, 500)
    assert_failure(await chat.receiver.end(), "boom")
    assert chat.receiver.batches == [[E1]]


async def test_closing_a_stream_before_its_end_drops_the_connection_and_its_later_events(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    await chat.peer.write(STREAM_HEAD + chunked(sse(E1)))
    assert await chat.receiver.next_batch() == [E1]
    chat.stream.close()
    assert await chat.peer.sees_eof()
    with contextlib.suppress(ConnectionError):  # the client's socket is gone: this may be reset
        await chat.peer.write(chunked(sse(E2) + DONE) + LAST_CHUNK)

    # A whole answer on another connection (the dropped one is not pooled) gives
    # the client every chance to hand on anything that reached it.
    other = await start_chat(client, engine)
    assert other.peer is not chat.peer
    await other.peer.write(stream_response(E3))
    assert await other.receiver.end() is None
    assert chat.receiver.batches == [[E1]]


async def start_tokenize(client: EngineClient, engine: ScriptedEngine, response: bytes) -> tuple[asyncio.Task, Request]:
    """count_prompt_tokens under way, the engine's reading of its request, and ``response`` written."""
    counting = asyncio.create_task(
        client.count_prompt_tokens(engine.url, model="tiny", messages=MESSAGES, continue_final_message=False)
    )
    peer = await engine.accept()
    request = await peer.read_request()
    await peer.write(response)
    return counting, request


async def test_count_prompt_tokens_posts_the_messages_and_returns_the_engines_count(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    counted = {"count": 9, "max_model_len": 2048, "tokens": [4, 205, 2843, 337, 1499, 6, 205, 5, 205]}
    counting, request = await start_tokenize(client, engine, json_response(200, counted))
    assert await bounded(counting) == 9
    assert request.line == "POST /tokenize HTTP/1.1"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {
        "model": "tiny",
        "messages": MESSAGES,
        "add_generation_prompt": True,
        "continue_final_message": False,
    }


async def test_count_prompt_tokens_answered_404_is_rejected_with_status_404(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    response = json_response(404, openai_error("The model `tiny` does not exist.", 404))
    counting, _ = await start_tokenize(client, engine, response)
    with pytest.raises(EngineRejected) as rejected:
        await bounded(counting)
    assert rejected.value.status == 404
    assert "does not exist" in rejected.value.message


async def test_an_answer_that_is_not_http_is_a_failure(client: EngineClient, engine: ScriptedEngine) -> None:
    assert_failure(await end_of_answer(client, engine, b"garbage\r\n\r\n"), "not HTTP/1.1")


async def test_count_prompt_tokens_answered_200_without_a_count_is_a_failure(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    # A failure, not a crash: the gateway then counts another way (another engine, or an estimate).
    counting, _ = await start_tokenize(client, engine, json_response(200, {"tokens": [1, 2]}))
    with pytest.raises(EngineFailure, match="no count"):
        await bounded(counting)


async def test_a_body_that_ends_with_the_connection_is_whole(client: EngineClient, engine: ScriptedEngine) -> None:
    # HTTP/1.1 allows a body with neither a length nor chunks, ended by closing the connection.
    content = json.dumps({"count": 3}).encode()
    counting = asyncio.create_task(
        client.count_prompt_tokens(engine.url, model="tiny", messages=MESSAGES, continue_final_message=False)
    )
    peer = await engine.accept()
    await peer.read_request()
    await peer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/json\r\n\r\n" + content)
    await peer.close()
    assert await bounded(counting) == 3


async def test_events_in_the_same_read_as_an_error_event_are_handed_on_first(
    client: EngineClient, engine: ScriptedEngine
) -> None:
    chat = await start_chat(client, engine)
    await chat.peer.write(STREAM_HEAD + chunked(sse(E1, E2, error_event(500))))
    assert_failure(await chat.receiver.end(), "boom")
    assert chat.receiver.batches == [[E1, E2]]
