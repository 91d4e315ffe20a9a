"""One simulated vLLM engine: continuous batching as a fluid model between events.

vLLM runs steps; each step decodes one token for every running sequence and
spends what is left of the token budget (`max_num_batched_tokens`) on
prefill, FIFO. A step costs

    decode_step + per_token x (running + prefill tokens) + per_context_token x KV tokens held

(the weights read once, the compute, the KV cache read; see profile.py).
Between two events the batch does not change, so neither do the rates: each
running sequence gains 1/step tokens per second and the head prompt is
prefilled at chunk/step tokens per second. Instead of walking every step
(millions in a day) the engine keeps a shared decode clock `v` (tokens each
running sequence has produced), and a sequence finishes when `v` reaches its
`finish_v`: one heap, one event per change.

Admission follows vLLM's scheduler: FIFO from the waiting queue while a batch
slot is free and the KV cache can hold prompt + output.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque

from spotrag_runtime.engine_emulator.metrics import one_two_five_buckets  # vLLM's bounds, as the emulator has them

from .presets import EngineSpec

PENDING, STARTING, READY, DRAINING, GONE = "Pending", "Starting", "Ready", "Draining", "Gone"
TOKEN_EPSILON = 1e-3


class Request:
    __slots__ = (
        "id",
        "arrival",
        "prompt",
        "output",
        "first_token",
        "done",
        "lost",
        "prefill_left",
        "finish_v",
        "queued_at",
        "resumes",
        "retries",
        "reserved",
    )

    def __init__(self, rid: int, arrival: float, prompt: int, output: int) -> None:
        self.id = rid
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.first_token: float | None = None
        self.done: float | None = None
        self.lost: str | None = None  # why it failed: "interrupted", "queue timeout", "unfinished"
        self.prefill_left = float(prompt)
        self.finish_v = 0.0
        self.queued_at = arrival
        self.resumes = 0
        self.retries = 0
        self.reserved = 0  # KV tokens held on the engine that admitted it

    @property
    def need(self) -> int:
        """KV tokens the request holds at most: prompt and every token it may generate."""
        return self.prompt + self.output


class Engine:
    """An engine pod and its node, from creation to deletion."""

    def __init__(self, eid: int, capacity: str, created: float, spec: EngineSpec) -> None:
        self.id = eid
        self.name = f"engine-{eid}"
        self.capacity = capacity
        self.spec = spec
        self.phase = PENDING
        self.since = created  # when the engine entered its phase
        self.created = created
        self.launched: float | None = None  # the node was asked for (billing starts)
        self.gone_at: float | None = None
        self.interrupted = False
        self.waiting: deque[Request] = deque()
        self.waiting_tokens = 0
        self.waiting_prompt = 0  # the prompt part of waiting_tokens
        self.prefill: deque[Request] = deque()
        self.prefill_total = 0.0  # prompt tokens still to prefill
        self.prefill_outputs = 0  # output tokens of requests still in prefill
        self.running: list[tuple[float, int, Request]] = []
        self.sum_finish = 0.0
        self.v = 0.0
        self.kv_used = 0
        self.last = created
        self.version = 0  # bumps when the next event time changes
        # vLLM's counters, for the operator's calibration: prompt tokens
        # prefilled, tokens generated, and the prompts of finished requests.
        self.prompt_counter = 0.0
        self.generation_counter = 0.0
        self.finished_prompt_counter = 0.0
        self.finished_counter = 0
        # vllm:request_prompt_tokens: finished requests per bucket (not cumulative), +Inf last.
        self.prompt_length_bounds = one_two_five_buckets(spec.max_model_len)
        self.prompt_length_counts = [0] * (len(self.prompt_length_bounds) + 1)

    # -- accounting -------------------------------------------------------------

    @property
    def requests(self) -> int:
        return len(self.waiting) + len(self.prefill) + len(self.running)

    @property
    def empty(self) -> bool:
        return not (self.waiting or self.prefill or self.running)

    def queued_tokens(self) -> float:
        """Prompt tokens not yet prefilled + output tokens not yet generated (the gateway's definition)."""
        decode_left = self.sum_finish - len(self.running) * self.v
        return self.waiting_tokens + self.prefill_total + self.prefill_outputs + decode_left

    def queued_prompt_tokens(self) -> float:
        """The prompt part of queued_tokens (the gateway's spotrag_queued_prompt_tokens)."""
        return self.waiting_prompt + self.prefill_total

    def assigned_tokens(self) -> int:
        return self.waiting_tokens + self.kv_used

    # -- the fluid model ---------------------------------------------------------

    def _step(self) -> tuple[float, float]:
        """(seconds per step, prompt tokens prefilled per step) for the current batch."""
        spec = self.spec
        n = len(self.running)
        chunk = min(spec.max_num_batched_tokens - n, self.prefill_total) if self.prefill else 0.0
        return spec.decode_step_seconds + spec.seconds_per_token * (
            n + chunk
        ) + spec.seconds_per_context_token * self.kv_used, chunk

    def advance(self, now: float) -> None:
        elapsed = now - self.last
        if elapsed > 0 and (self.running or self.prefill):
            step, chunk = self._step()
            if self.prefill:
                done = elapsed * chunk / step
                self.prefill[0].prefill_left -= done
                self.prefill_total -= done
                self.prompt_counter += done
            if self.running:
                self.v += elapsed / step
                self.generation_counter += len(self.running) * elapsed / step
        self.last = now

    def next_event(self) -> float | None:
        """When the head prompt finishes prefill or the first sequence finishes decoding."""
        if not (self.running or self.prefill):
            return None
        step, chunk = self._step()
        times = []
        if self.prefill:
            times.append(self.last + max(0.0, self.prefill[0].prefill_left) * step / chunk)
        if self.running:
            times.append(self.last + max(0.0, self.running[0][0] - self.v) * step)
        return min(times)

    def accept(self, request: Request, now: float) -> None:
        self.advance(now)
        self.waiting.append(request)
        self.waiting_tokens += request.need
        self.waiting_prompt += request.prompt
        self.admit()

    def admit(self) -> None:
        spec = self.spec
        while (
            self.waiting
            and len(self.running) + len(self.prefill) < spec.max_num_seqs
            and self.kv_used + self.waiting[0].need <= spec.kv_cache_tokens
        ):
            request = self.waiting.popleft()
            self.waiting_tokens -= request.need
            self.waiting_prompt -= request.prompt
            request.reserved = request.need
            self.kv_used += request.reserved
            request.prefill_left = float(request.prompt)
            self.prefill.append(request)
            self.prefill_total += request.prompt
            self.prefill_outputs += request.output

    def progress(self, now: float) -> tuple[list[Request], list[Request]]:
        """Advance to `now`; return (requests that got their first token, requests finished)."""
        self.advance(now)
        first, finished = [], []
        while self.prefill and self.prefill[0].prefill_left <= TOKEN_EPSILON:
            request = self.prefill.popleft()
            self.prefill_total = max(0.0, self.prefill_total - max(0.0, request.prefill_left))
            self.prefill_outputs -= request.output
            if not self.prefill:
                self.prefill_total = 0.0  # no drift left behind
            if request.first_token is None:
                request.first_token = now
                first.append(request)
            # The prefill step produced one token; the rest are decoded.
            self.generation_counter += 1
            request.output -= 1
            if request.output <= 0:
                self._release(request)
                finished.append(request)
            else:
                request.finish_v = self.v + request.output
                heapq.heappush(self.running, (request.finish_v, request.id, request))
                self.sum_finish += request.finish_v
        while self.running and self.running[0][0] - self.v <= TOKEN_EPSILON:
            _, _, request = heapq.heappop(self.running)
            self.sum_finish -= request.finish_v
            request.output = 0
            self._release(request)
            finished.append(request)
        if not self.running:
            self.sum_finish = 0.0
        if finished:
            self.admit()
        return first, finished

    def _release(self, request: Request) -> None:
        self.kv_used -= request.reserved
        request.reserved = 0
        self.finished_prompt_counter += request.prompt
        self.finished_counter += 1
        self.prompt_length_counts[bisect.bisect_left(self.prompt_length_bounds, request.prompt)] += 1

    def prompt_buckets(self) -> dict[str, float]:
        """vllm:request_prompt_tokens_bucket as scraped: cumulative {le: count}."""
        cumulative, total = {}, 0
        for bound, count in zip((*self.prompt_length_bounds, "+Inf"), self.prompt_length_counts, strict=True):
            total += count
            cumulative[bound if bound == "+Inf" else str(bound)] = float(total)
        return cumulative

    def take_all(self) -> tuple[list[Request], list[Request]]:
        """Empty the engine (its node is going): (never started, started), each as it stands."""
        not_started = list(self.waiting)
        self.waiting.clear()
        self.waiting_tokens = self.waiting_prompt = 0
        started = []
        for request in self.prefill:
            # No token was produced yet: the whole prompt is redone elsewhere.
            request.reserved = 0
            not_started.append(request)
        self.prefill.clear()
        self.prefill_total = 0.0
        self.prefill_outputs = 0
        for finish_v, _, request in sorted(self.running):
            left = max(1, round(finish_v - self.v))
            # Resume: the answer so far (the prefill's token and those decoded
            # since) becomes part of the prompt on the next engine.
            request.prompt += 1 + max(0, request.output - left)
            request.output = left
            request.reserved = 0
            started.append(request)
        self.running = []
        self.sum_finish = 0.0
        self.kv_used = 0
        return not_started, started

    def take_waiting(self) -> list[Request]:
        """Hand back requests the engine has not started (a gateway retries them elsewhere)."""
        taken = list(self.waiting)
        self.waiting.clear()
        self.waiting_tokens = self.waiting_prompt = 0
        return taken
