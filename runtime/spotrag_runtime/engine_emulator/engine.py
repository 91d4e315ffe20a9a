"""The capacity model: a scheduler that behaves like vLLM's, without a model.

One asyncio timer drives everything, like vLLM's engine step loop:

* **Admission.** Requests wait in FIFO order until a batch slot
  (``max_num_seqs``) and KV blocks for their context are free.
* **Prefill.** Prompt processing is serial at ``prefill_tokens_per_s``; a
  request's first token comes ``ttft_ms`` after its prefill ends. Prefill
  work also stalls the next decode step, as a mixed batch does on a GPU.
* **Decode.** Every step emits one token for each decoding sequence; a step
  lasts ``itl_ms * (1 + itl_growth_per_seq * (running - 1))``, so tokens come
  slower as the batch grows.
* **KV cache.** A sequence holds ``ceil(tokens / block_size)`` blocks and
  takes a new one as it grows; when none is free the most recently admitted
  sequence is preempted (blocks freed, back to the head of the queue, its
  context recomputed on readmission), as vLLM does.

Wakeups are per step, not per token, so hundreds of streams stay cheap.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from .config import EmulatorConfig

# Timer callbacks may fire a hair early; treat events this close as due.
TIME_EPSILON_S = 1e-4


class State(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


class EngineObserver(Protocol):
    """What the engine reports as it works (the metrics implement it)."""

    def request_admitted(self, queue_time_s: float) -> None: ...
    def first_token(self, ttft_s: float, prompt_tokens: int) -> None: ...
    def tokens_generated(self, count: int) -> None: ...
    def request_finished(self, finish_reason: str, e2e_s: float, prompt_tokens: int) -> None: ...
    def preempted(self) -> None: ...


class Sequence:
    """One request inside the engine, and the handle its HTTP response reads from."""

    def __init__(
        self,
        *,
        prompt_tokens: int,
        max_new_tokens: int,
        deltas: Iterator[str],
        natural_remaining: int,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        streaming: bool = True,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.deltas = deltas
        self.streaming = streaming
        natural_end = max(natural_remaining, min_tokens)
        if ignore_eos or natural_end >= max_new_tokens:
            self.stop_at, self.stop_reason = max_new_tokens, "length"
        else:
            self.stop_at, self.stop_reason = natural_end, "stop"
        self.state = State.WAITING
        self.generated = 0
        self.context_tokens = prompt_tokens
        self.blocks = 0
        self.pending: list[str] = []  # streamed deltas not yet read
        self.text_parts: list[str] = []  # the whole text, for answers that are not streamed
        self.finish_reason: str | None = None
        self.arrival_time = 0.0
        self.admitted_time: float | None = None
        self.first_token_time: float | None = None
        self.first_token_at = 0.0
        self.last_emit_at = -1.0
        self._waiter: asyncio.Future[None] | None = None

    async def next_output(self) -> tuple[str, str | None]:
        """New text since the last call and, once done, the finish reason."""
        while not self.pending and self.finish_reason is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        text = "".join(self.pending)
        self.pending.clear()
        return text, self.finish_reason

    async def result(self) -> tuple[str, str]:
        """The whole generated text and the finish reason, once finished."""
        while self.finish_reason is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return "".join(self.text_parts), self.finish_reason

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Engine:
    def __init__(self, config: EmulatorConfig, observer: EngineObserver) -> None:
        self.config = config
        self.observer = observer
        self.waiting: deque[Sequence] = deque()
        # Admitted sequences in admission order (the last is preempted first).
        self.running: list[Sequence] = []
        # Sequences whose prefill is under way, by when it ends (nondecreasing).
        self.prefilling: deque[Sequence] = deque()
        self.free_blocks = config.num_gpu_blocks
        self._prefill_free_at = 0.0
        self._decode_stall_s = 0.0
        self._next_step_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopped = False

    # -- what the server and the metrics read -------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.config.num_gpu_blocks

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- requests in and out -------------------------------------------------

    def add(self, seq: Sequence) -> None:
        now = asyncio.get_running_loop().time()
        seq.arrival_time = now
        self.waiting.append(seq)
        self._idle.clear()
        self._admit(now)
        self._arm()

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (client gone, or shutdown): frees its slot and blocks."""
        if seq.state is State.FINISHED:
            return
        now = asyncio.get_running_loop().time()
        self._finish(seq, "abort", now)
        self._admit(now)
        self._arm()

    def abort_all(self, *, last_step: bool = False) -> None:
        """Abort every request; with ``last_step``, as vLLM shutting down with no
        timeout does: a decoding sequence's abort carries the step in flight (one
        more token), as the real server's last chunk does."""
        for seq in [*self.running, *self.waiting]:
            if last_step and seq.state is State.DECODING and seq.generated < seq.stop_at:
                (seq.pending if seq.streaming else seq.text_parts).append(next(seq.deltas))
                seq.generated += 1
                seq.context_tokens += 1
                self.observer.tokens_generated(1)
            self.abort(seq)

    def stop(self) -> None:
        """The engine process is gone (vLLM's --shutdown-timeout ran out): no more
        steps. Its requests stay unfinished, so their responses wait for bytes
        that never come, until their clients give up (``abort``)."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    # -- the step loop ---------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _admit(self, now: float) -> None:
        if self.stopped:
            return
        config = self.config
        while self.waiting and len(self.running) < config.max_num_seqs:
            seq = self.waiting[0]
            # Room for the context plus the next token, as vLLM's scheduler asks.
            needed = self._blocks_for(seq.context_tokens + 1)
            if needed > self.free_blocks:
                break
            self.waiting.popleft()
            self.free_blocks -= needed
            seq.blocks = needed
            seq.state = State.PREFILLING
            prefill_s = seq.context_tokens / config.prefill_tokens_per_s
            prefill_end = max(now, self._prefill_free_at) + prefill_s
            self._prefill_free_at = prefill_end
            self._decode_stall_s += prefill_s
            seq.first_token_at = prefill_end + config.ttft_ms / 1000
            self.running.append(seq)
            self.prefilling.append(seq)
            if seq.admitted_time is None:
                seq.admitted_time = now
                self.observer.request_admitted(now - seq.arrival_time)

    def _step_duration(self) -> float:
        config = self.config
        batch = max(len(self.running), 1)
        duration = config.itl_ms / 1000 * (1 + config.itl_growth_per_seq * (batch - 1))
        duration += self._decode_stall_s
        self._decode_stall_s = 0.0
        return duration

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = asyncio.get_running_loop().time()
        due = now + TIME_EPSILON_S
        emitted = 0
        while self.prefilling and self.prefilling[0].first_token_at <= due:
            seq = self.prefilling.popleft()
            seq.state = State.DECODING
            if seq.generated >= seq.stop_at:
                self._finish(seq, seq.stop_reason, now)
            else:
                self._emit(seq, now)
                emitted += 1
            if self._next_step_at is None:
                self._next_step_at = now + self._step_duration()
        if self._next_step_at is not None and self._next_step_at <= due:
            step_began = self._next_step_at
            decoders = [s for s in self.running if s.state is State.DECODING and s.last_emit_at != now]
            self._reserve_blocks(decoders)
            for seq in decoders:
                if seq.state is State.DECODING:
                    self._emit(seq, now)
                    emitted += 1
            self._next_step_at = None
            if any(s.state is State.DECODING for s in self.running):
                # Keep the cadence from when the step was due, so timer lateness
                # does not pile up into a slower engine than configured.
                self._next_step_at = max(step_began + self._step_duration(), now)
        if emitted:
            self.observer.tokens_generated(emitted)
        self._admit(now)
        self._arm()

    def _reserve_blocks(self, decoders: list[Sequence]) -> None:
        """Give each decoder the block its next token needs, preempting if full."""
        block_size = self.config.block_size
        for seq in decoders:
            if seq.state is not State.DECODING or seq.context_tokens < seq.blocks * block_size:
                continue
            while self.free_blocks == 0 and seq.state is State.DECODING:
                self._preempt(self.running[-1])
            if seq.state is State.DECODING:
                self.free_blocks -= 1
                seq.blocks += 1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.state is State.PREFILLING:
            self.prefilling.remove(seq)
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.state = State.WAITING
        self.waiting.appendleft(seq)
        self.observer.preempted()

    def _emit(self, seq: Sequence, now: float) -> None:
        # A stream hands each delta over once; a whole answer keeps them all.
        (seq.pending if seq.streaming else seq.text_parts).append(next(seq.deltas))
        seq.generated += 1
        seq.context_tokens += 1
        seq.last_emit_at = now
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.observer.first_token(now - seq.arrival_time, seq.prompt_tokens)
        if seq.generated >= seq.stop_at:
            self._finish(seq, seq.stop_reason, now)
        elif seq.streaming:
            seq._wake()

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        if seq.state is State.WAITING:
            self.waiting.remove(seq)
        else:
            if seq.state is State.PREFILLING:
                self.prefilling.remove(seq)
            self.running.remove(seq)
            self.free_blocks += seq.blocks
            seq.blocks = 0
        seq.state = State.FINISHED
        seq.finish_reason = reason
        self.observer.request_finished(reason, now - seq.arrival_time, seq.prompt_tokens)
        seq._wake()
        if not self.running and not self.waiting:
            self._next_step_at = None
            self._idle.set()

    def _arm(self) -> None:
        if self.stopped:
            return
        when = math.inf
        if self.prefilling:
            when = self.prefilling[0].first_token_at
        if self._next_step_at is not None:
            when = min(when, self._next_step_at)
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when != math.inf:
            self._timer = asyncio.get_running_loop().call_at(when, self._tick)
