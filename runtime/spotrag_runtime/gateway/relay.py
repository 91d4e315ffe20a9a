"""One chat request's way through admission and the engines, with failover.

Every request is streamed from the engine, whatever the client asked, so
tokens can be counted as they come and a broken answer can be resumed; the
route turns the chunks back into one response for a non-streaming client.

Failover:

- An attempt that fails before its first token (engine unreachable, 5xx,
  silent past the read timeout, stream cut) is sent to another engine. The
  client notices nothing.
- An attempt that fails mid-answer is resumed on another engine: the
  conversation plus the partial answer as the last assistant message, with
  ``continue_final_message: true``, ``add_generation_prompt: false`` and
  max_tokens lowered by the tokens already sent. The client sees one stream
  (same id, no second role chunk).
- A stream that stalls is resumed too: vLLM whose ``--shutdown-timeout``
  runs out with a stream open stops sending bytes but keeps the connection
  open (and does not exit until the client drops it), so waiting for the read
  timeout would freeze the answer. Once an attempt has produced a token, a
  silence longer than ``max(failover.stallTimeoutSeconds,
  failover.stallItlMultiplier x this stream's inter-token latency p99)`` ends
  the attempt (``failover.drainingStallTimeoutSeconds`` instead of the first
  once the engine has left the serving set: it is draining, and its drain's
  end is what a silence most likely means): the connection is dropped (which
  lets that vLLM exit) and the answer goes on elsewhere. A vLLM aborting its requests at shutdown
  (``finish_reason: "abort"``) is resumed the same way.
- ``failover.maxAttempts`` attempts in a row that produce no new token fail
  the request (502). An attempt that streamed tokens before it broke does not
  use one up: its work is kept, so a long answer survives several
  interruptions. A refused connection (an engine still loading or already
  shutting down) does not use one up either while some engine has not
  refused this request: the engine is not serving, which says nothing about
  the rest of the fleet. An engine's own 4xx is passed to the client, not
  retried.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from spotrag_runtime.gateway import fastjson
from spotrag_runtime.gateway.config import FailoverConfig
from spotrag_runtime.gateway.errors import EnginesFailed
from spotrag_runtime.gateway.metrics import GatewayMetrics
from spotrag_runtime.gateway.prompt import message_text
from spotrag_runtime.gateway.token_queue import AdmissionController, Engine, Ticket
from spotrag_runtime.gateway.upstream import EngineClient, EngineFailure, EngineRefused, EngineStream, PromptEstimator

log = logging.getLogger(__name__)

# Asked of every engine: usage in every chunk gives exact token counts.
UPSTREAM_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


@dataclass
class ChatJob:
    """A validated request, ready for the engines."""

    body: dict[str, Any]  # what the engine gets, less messages and max_tokens
    messages: list[dict[str, Any]]
    prompt_tokens: int
    max_tokens: int
    served_model: str
    # The raw estimate prompt_tokens came from, until the engine reports the exact count.
    prompt_estimate: int | None = None
    affinity: tuple[bytes, ...] = ()
    continuous_usage: bool = False  # the client asked for usage in every chunk
    arrived_at: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ChatOutcome:
    """What the stream produced, once it is over."""

    # The answer so far, in pieces: text, or the raw `"choices":[…]` bytes of a
    # chunk relayed without decoding it (decoded when the text is needed: to
    # resume, or to answer a client that did not stream).
    pieces: list[str | bytes] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # as the first engine reported it
    resumes: int = 0

    @property
    def text(self) -> str:
        """The answer so far."""
        text = "".join(piece if isinstance(piece, str) else _content_of(piece) for piece in self.pieces)
        self.pieces = [text]  # decoded once
        return text

    def usage(self, job: ChatJob) -> dict[str, int]:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else job.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.generated, "total_tokens": prompt + self.generated}


def _content_of(choices: bytes) -> str:
    return fastjson.loads(b"{" + choices + b"}")["choices"][0]["delta"].get("content") or ""


class ClientSink(Protocol):
    """Where a streamed answer's bytes go, written from the engine connection's
    callbacks (``routes.streaming.ClientWriter``)."""

    # A write the client is not taking yet (its socket's buffer is full): the
    # engine's reads pause until it is done.
    blocked: asyncio.Future[Any] | None

    def write(self, chunks: list[bytes]) -> None: ...


class ChatRelay:
    def __init__(
        self,
        *,
        admission: AdmissionController,
        client: EngineClient,
        failover: FailoverConfig,
        metrics: GatewayMetrics,
        estimator: PromptEstimator | None = None,
    ) -> None:
        self.admission = admission
        self.client = client
        self.failover = failover
        self.metrics = metrics
        self.estimator = estimator or PromptEstimator()

    async def answer(self, job: ChatJob, outcome: ChatOutcome, sink: ClientSink | None = None) -> None:
        """Get the answer from the engines; ``sink`` gets it as the client's
        Server-Sent Events (chat.completion.chunk) as it comes, the engine's
        usage replaced by the request's own (in every chunk only if asked);
        ``outcome`` holds the text and the totals. Returns once the answer is
        complete; raises what ended it otherwise (EnginesFailed, the engine's
        4xx as EngineRejected, QueueFull...). Cancelling it drops the engine's
        connection (vLLM aborts the request) and gives the queued tokens back."""
        ticket = Ticket(prompt_tokens=job.prompt_tokens, max_tokens=job.max_tokens, affinity=job.affinity)
        failures_in_a_row = 0
        refused_by: set[str] = set()
        retry = False
        stream = _ClientStream(job, outcome, self.metrics)
        try:
            while True:
                engine = await self.admission.admit(ticket, retry=retry)
                stream.attempt_started()
                attempt = _Attempt(self, job, ticket, stream, sink, engine)
                try:
                    await attempt.run(self._attempt_body(job, outcome))
                    if stream.aborted:
                        raise EngineFailure(f"{engine.url} aborted the answer (shutting down)")
                    if outcome.finish_reason is None:
                        raise EngineFailure(f"{engine.url} ended the answer without a finish_reason")
                    return
                except EngineFailure as failure:
                    if outcome.finish_reason is not None:
                        return  # the answer was complete; only the stream's trailer was lost
                    if isinstance(failure, _Stalled):
                        self.metrics.stalled_streams.inc()
                    if isinstance(failure, EngineRefused):
                        refused_by.add(engine.url)
                    if isinstance(failure, EngineRefused) and not refused_by >= self.admission.engines.keys():
                        pass  # not serving: no strike while another engine may take it
                    else:
                        failures_in_a_row = 1 if stream.attempt_progressed else failures_in_a_row + 1
                    log.warning("attempt on %s failed after %d tokens: %s", engine.url, outcome.generated, failure)
                    if outcome.generated >= job.max_tokens:
                        # Every allowed token was sent; only the finish chunk was lost.
                        outcome.finish_reason = "length"
                        if sink is not None:
                            sink.write([self._finish_chunk(job, "length")])
                        return
                    if failures_in_a_row >= self.failover.max_attempts:
                        raise EnginesFailed(
                            f"The answer failed on {failures_in_a_row} engine attempt(s) in a row; last: {failure}"
                        ) from None
                    if outcome.generated and not self.failover.resume_streams:
                        raise EnginesFailed(f"The engine failed mid-answer and resuming is off: {failure}") from None
                    if outcome.generated:
                        outcome.resumes += 1
                        self.metrics.resumed_streams.inc()
                    else:
                        self.metrics.retries.inc()
                    # The next engine prefills the prompt plus the partial answer.
                    self.admission.requeue(ticket, failed=engine, prompt_tokens=job.prompt_tokens + outcome.generated)
                    retry = True
                finally:
                    attempt.close()
        finally:
            self.admission.release(ticket)

    def _correct_prompt(self, job: ChatJob, ticket: Ticket, reported: int) -> None:
        """The engine counted the prompt admitted on an estimate: the request
        (and a resume's prefill) counts the engine's number from now on, and
        the estimator learns from the difference."""
        assert job.prompt_estimate is not None
        self.estimator.learn(job.prompt_estimate, reported)
        job.prompt_estimate = None
        job.prompt_tokens = ticket.prompt_tokens = reported

    def _attempt_body(self, job: ChatJob, outcome: ChatOutcome) -> dict[str, Any]:
        body = dict(job.body)
        body["stream"] = True
        body["stream_options"] = UPSTREAM_STREAM_OPTIONS
        body["max_tokens"] = job.max_tokens - outcome.generated
        if not outcome.generated:
            body["messages"] = job.messages
            return body
        partial = outcome.text
        messages = list(job.messages)
        if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
            last = messages[-1]
            messages[-1] = {**last, "content": message_text(last.get("content")) + partial}
        else:
            messages.append({"role": "assistant", "content": partial})
        body["messages"] = messages
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(body["min_tokens"] - outcome.generated, 0)
        return body

    @staticmethod
    def _finish_chunk(job: ChatJob, finish_reason: str) -> bytes:
        return _sse(
            {
                "id": job.id,
                "object": "chat.completion.chunk",
                "created": job.created,
                "model": job.served_model,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}],
            }
        )


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + fastjson.dumps(chunk) + b"\n\n"


def _chunk_prefix(chunk_id: Any, created: Any, model: Any) -> bytes:
    """How vLLM begins every chunk of a stream, up to its choices."""
    return (
        b'{"id":'
        + fastjson.dumps(chunk_id)
        + b',"object":"chat.completion.chunk","created":'
        + fastjson.dumps(created)
        + b',"model":'
        + fastjson.dumps(model)
        + b","
    )


# A chunk of answer text, as vLLM writes it: relayed as bytes (below).
_TEXT_CHOICE = b'"choices":[{"index":0,"delta":{"content":"'
_EMPTY_TEXT_CHOICE = b'"choices":[{"index":0,"delta":{"content":""'
_NOT_FINISHED = b'"finish_reason":null'
_USAGE = b',"usage":'


class _ClientStream:
    """Turns engine chunks into the client's one stream: counts tokens, keeps
    the text for a resume, drops a resumed engine's second role chunk and
    gives every chunk the request's own id.

    Bytes in, bytes out, parsing little: a chunk of answer text laid out as
    vLLM writes it (the stream's own id, created and model; one choice whose
    delta starts with non-empty content; no finish_reason; usage last) is
    relayed by swapping its head for the request's and its usage for the
    request's own (or none), reading only the usage counts. Its choices are
    kept as bytes and decoded only if the text is needed. Any other chunk
    (the role chunk, the finish, an abort, anything laid out otherwise) is
    parsed and rewritten in full. The byte checks cannot be fooled by the
    text: inside a JSON string every quote is escaped."""

    def __init__(self, job: ChatJob, outcome: ChatOutcome, metrics: GatewayMetrics) -> None:
        self.job = job
        self.outcome = outcome
        self.metrics = metrics
        self.role_sent = False
        self.last_content_at: float | None = None
        self.produced_before = 0
        self.aborted = False
        self.engine_prefix: bytes | None = None  # how this attempt's chunks begin
        self.job_prefix = _chunk_prefix(job.id, job.created, job.served_model)

    def attempt_started(self) -> None:
        self.produced_before = self.outcome.generated
        self.aborted = False
        self.engine_prefix = None

    @property
    def attempt_progressed(self) -> bool:
        return self.outcome.generated > self.produced_before

    def take(self, data: bytes) -> bytes | None:
        """The client's event for one engine event (the JSON after ``data:``), or None to drop it."""
        if self.engine_prefix is not None and data.startswith(self.engine_prefix):
            relayed = self._take_text(data)
            if relayed is not None:
                return relayed
        try:
            chunk = fastjson.loads(data)
        except fastjson.JSONDecodeError as error:
            raise EngineFailure(f"the engine sent an event that is not JSON: {error}") from None
        if self.engine_prefix is None and chunk.get("object") == "chat.completion.chunk":
            prefix = _chunk_prefix(chunk.get("id"), chunk.get("created"), chunk.get("model"))
            if data.startswith(prefix):
                self.engine_prefix = prefix
        taken = self._take_parsed(chunk)
        return None if taken is None else _sse(taken)

    def _take_text(self, data: bytes) -> bytes | None:
        """A chunk of text relayed as bytes; None (having changed nothing) if it is laid out otherwise."""
        start = len(self.engine_prefix or b"")
        if not data.startswith(_TEXT_CHOICE, start) or data.startswith(_EMPTY_TEXT_CHOICE, start):
            return None
        if not data.endswith(b"}"):
            return None
        end = data.rfind(_USAGE, start)
        usage = None
        if end >= 0:
            try:
                usage = fastjson.loads(data[end + len(_USAGE) : -1])
            except fastjson.JSONDecodeError:
                return None  # more after the usage: not vLLM's layout
            if usage is not None and not isinstance(usage, dict):
                return None
        else:
            end = len(data) - 1
        choices = data[start:end]
        if _NOT_FINISHED not in choices:
            return None
        outcome = self.outcome
        if usage:
            if outcome.prompt_tokens is None and not outcome.resumes:
                outcome.prompt_tokens = usage.get("prompt_tokens")
            if "completion_tokens" in usage:
                outcome.generated = self.produced_before + usage["completion_tokens"]
            else:
                outcome.generated += 1
        else:
            outcome.generated += 1
        self.role_sent = True
        outcome.pieces.append(choices)
        self._token_arrived()
        if self.job.continuous_usage:
            return b"data: " + self.job_prefix + choices + _USAGE + fastjson.dumps(outcome.usage(self.job)) + b"}\n\n"
        return b"data: " + self.job_prefix + choices + b"}\n\n"

    def _token_arrived(self) -> None:
        now = time.perf_counter()
        if self.last_content_at is None:
            self.metrics.time_to_first_token.observe(now - self.job.arrived_at)
        else:
            self.metrics.inter_token_latency.observe(now - self.last_content_at)
        self.last_content_at = now

    def _take_parsed(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        outcome = self.outcome
        usage = chunk.pop("usage", None)
        if usage and outcome.prompt_tokens is None and not outcome.resumes:
            outcome.prompt_tokens = usage.get("prompt_tokens")
        choices = chunk.get("choices")
        if not choices:
            return None  # the usage-only chunk at the end
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content") or ""
        finish_reason = choice.get("finish_reason")
        if usage and "completion_tokens" in usage:  # exact, from continuous usage stats
            outcome.generated = self.produced_before + usage["completion_tokens"]
        elif content:
            outcome.generated += 1
        if finish_reason == "abort":
            # The engine gave up the request (vLLM shutting down with no time
            # left): not the client's answer's end; its text is kept and resumed.
            self.aborted = True
            choice["finish_reason"] = finish_reason = None
            choice.pop("stop_reason", None)
            if not content:
                return None
        if finish_reason:
            outcome.finish_reason = finish_reason
        if self.role_sent:
            if not content and not finish_reason and delta.keys() <= {"role", "content"}:
                return None  # a resumed engine's own role chunk
            delta.pop("role", None)
        self.role_sent = True
        if content:
            outcome.pieces.append(content)
            self._token_arrived()
        chunk["id"], chunk["created"], chunk["model"] = self.job.id, self.job.created, self.job.served_model
        if self.job.continuous_usage:
            chunk["usage"] = outcome.usage(self.job)
        return chunk


class _Stalled(EngineFailure):
    """The engine stopped sending mid-answer with the connection left open."""


class _Attempt:
    """One engine's try at the answer, driven by its connection's callbacks:
    the events of each network read are taken into the client's stream and
    written to the client in the same callback (no task step per token);
    ``run`` waits for the end.

    It also times the engine's silence, with one timer per attempt (not reset
    per read: it looks at the last read's time when it fires, and is set
    again for when the silence could be overdue): ``failover.readTimeoutSeconds``
    until the attempt's first token, from then on the stall bound
    (``_StallWatch``) as well. Reads paused while the client is not keeping up
    do not count as silence."""

    def __init__(
        self,
        relay: ChatRelay,
        job: ChatJob,
        ticket: Ticket,
        stream: _ClientStream,
        sink: ClientSink | None,
        engine: Engine,
    ) -> None:
        self.relay = relay
        self.job = job
        self.ticket = ticket
        self.stream = stream
        self.sink = sink
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.stall = _StallWatch(relay.failover, job.max_tokens - stream.outcome.generated, engine)
        self.read_timeout = relay.client.read_timeout
        self.upstream: EngineStream | None = None
        self.over: asyncio.Future[None] = self.loop.create_future()
        self.error: Exception | None = None
        self.last_read = 0.0
        self.armed = False  # the attempt has produced a token: the stall bound applies
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, body: dict[str, Any]) -> None:
        """Send the request and wait for the answer's end; raises what ended it otherwise."""
        self.upstream = await self.relay.client.stream_chat(self.engine.url, body, self)
        self.last_read = self.loop.time()
        if not self.over.done():
            self._timer = self.loop.call_at(self.last_read + self.read_timeout, self._check_silence)
        await self.over
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self._end(None)

    # StreamReceiver: the connection's callbacks
    def events(self, batch: list[bytes]) -> None:
        if self.over.done():
            return  # ended (a stall, a failed chunk) while these bytes were on their way
        now = self.loop.time()
        stream = self.stream
        if self.armed:
            self.stall.observe(now - self.last_read)
        self.last_read = now
        try:
            chunks = [chunk for data in batch if (chunk := stream.take(data)) is not None]
            if not self.armed and stream.attempt_progressed:
                self._arm()
            job, outcome = self.job, stream.outcome
            if job.prompt_estimate is not None and outcome.prompt_tokens is not None:
                self.relay._correct_prompt(job, self.ticket, outcome.prompt_tokens)
            self.relay.admission.progress(self.ticket, outcome.generated)
            sink = self.sink
            if chunks and sink is not None:
                sink.write(chunks)
                if sink.blocked is not None and not self.paused:
                    self._pause(sink.blocked)
        except Exception as error:  # a chunk that is not JSON (EngineFailure), a failed write, a bug
            self._end(error)

    def ended(self, error: Exception | None) -> None:
        self._end(error)

    def _end(self, error: Exception | None) -> None:
        if self.over.done():
            return
        self.error = error
        self.over.set_result(None)
        if error is not None and self.upstream is not None:
            self.upstream.close()  # nothing more from this engine

    def _pause(self, blocked: asyncio.Future[Any]) -> None:
        """The client is not taking the answer as fast as it comes: the engine waits."""
        assert self.upstream is not None
        self.paused = True
        self.relay.metrics.slow_client_pauses.inc()
        self.upstream.pause_reading()
        blocked.add_done_callback(self._resume)

    def _resume(self, _: asyncio.Future[Any]) -> None:
        self.paused = False
        self.last_read = self.loop.time()  # the silence starts now
        if self.upstream is not None and not self.over.done():
            self.upstream.resume_reading()

    def _arm(self) -> None:
        """The attempt's first token: the stall bound applies from now on (the timer moves up to it)."""
        self.armed = True
        if self.stall.floor > 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = self.loop.call_at(self.last_read + self.stall.bound, self._check_silence)

    def _check_silence(self) -> None:
        now = self.loop.time()
        read_timeout = self.read_timeout
        stalling = self.armed and self.stall.floor > 0
        bound = min(read_timeout, self.stall.bound) if stalling else read_timeout
        if not self.paused and now >= self.last_read + bound:
            self._timer = None
            if stalling and bound < read_timeout:
                self._end(_Stalled(f"no token for {bound:.2f}s (stall bound) with the stream still open"))
            else:
                self._end(EngineFailure(f"{self.engine.url}: no bytes for {read_timeout:g}s (read timeout)"))
            return
        # Not overdue: look again when it could be; no later than the draining floor
        # from now, so that an engine leaving the serving set shortens the wait.
        start = now if self.paused else self.last_read
        deadline = start + bound
        if stalling:
            deadline = min(deadline, now + self.stall.draining_floor)
        self._timer = self.loop.call_at(deadline, self._check_silence)


# The stall bound scales with this quantile of the stream's gaps between reads.
_ITL_QUANTILE = 0.99


class _StallWatch:
    """The stall bound of an attempt's stream once it has produced a token:
    max(floor, k x the p99 of this stream's gaps between reads so far)."""

    def __init__(self, failover: FailoverConfig, max_tokens: int, engine: Engine | None = None) -> None:
        self.floor = failover.stall_timeout_seconds
        self.draining_floor = failover.draining_stall_timeout_seconds
        self.multiplier = failover.stall_itl_multiplier
        self.engine = engine
        self.gaps = 0
        self.capacity = self._rank(max_tokens)
        self.largest: list[float] = []  # min-heap of the `capacity` largest gaps
        self._p99 = 0.0

    @staticmethod
    def _rank(count: int) -> int:
        """Which largest gap is the p99 of ``count`` gaps (1: the largest)."""
        return int(count * (1 - _ITL_QUANTILE)) + 1

    @property
    def p99(self) -> float:
        return self._p99

    def _update_p99(self) -> None:
        rank = min(self._rank(self.gaps), len(self.largest))
        self._p99 = self.largest[0] if rank == len(self.largest) else heapq.nlargest(rank, self.largest)[-1]

    @property
    def bound(self) -> float:
        # An engine that left the serving set is draining: its silence is likely the end.
        draining = self.engine is not None and not self.engine.present
        floor = min(self.floor, self.draining_floor) if draining else self.floor
        return max(floor, self.multiplier * self.p99)

    def observe(self, gap: float) -> None:
        self.gaps += 1
        if len(self.largest) < self.capacity:
            heapq.heappush(self.largest, gap)
        elif gap > self.largest[0]:
            heapq.heapreplace(self.largest, gap)
        elif self.gaps % 100:
            return  # neither the top gaps nor the p99's rank changed (it moves every 100 gaps)
        self._update_p99()
