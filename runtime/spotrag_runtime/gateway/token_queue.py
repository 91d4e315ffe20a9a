"""Token-aware admission: a FIFO queue in front of the engines, a per-engine
budget, and the engine picker.

Every request is a ``Ticket`` whose *outstanding tokens* are the prompt
tokens not yet prefilled plus the output tokens still allowed by max_tokens:

    outstanding = (0 if prefilled else prompt_tokens) + (max_tokens - generated)

``queued_tokens`` is the sum over every ticket waiting or admitted; it is the
``spotrag_queued_tokens`` gauge the operator scales on (docs/gateway.md).
``queued_prompt_tokens`` and ``queued_output_tokens`` are its two parts (they
always add up to it): the operator weighs a prompt token at the engine's
prefill rate and an output token at its decode rate.
A ticket counts from the moment it asks for admission until it is released;
its first answer token marks the prompt prefilled, and each later token
lowers what is still allowed.

An engine takes a ticket while it holds fewer than
``maxInflightRequestsPerEngine`` requests and its outstanding tokens plus the
ticket's stay within ``maxInflightTokensPerEngine`` (an idle engine takes any
ticket, so one large request cannot wait forever). Tickets wait in arrival
order; a retry after an engine failure goes to the front. Among the engines
that fit, the one with the fewest outstanding tokens wins (ties go to the one
picked least recently), unless prefix affinity sends the ticket to the engine
that served the same prompt prefix, when that engine's extra load is smaller
than the prefill its prefix cache saves.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from spotrag_runtime.gateway.config import AdmissionConfig
from spotrag_runtime.gateway.errors import QueueFull, Unavailable

# Prefix affinity hashes the prompt in blocks of this many characters (about
# 64 tokens), up to AFFINITY_MAX_BLOCKS; only whole blocks form a prefix.
AFFINITY_BLOCK_CHARS = 256
AFFINITY_MAX_BLOCKS = 32
AFFINITY_MAX_ENTRIES = 65536
CHARS_PER_TOKEN = 4


def prefix_keys(text: str) -> tuple[bytes, ...]:
    """Hashes of the text's first 1, 2, 3… blocks: shared prefixes share keys."""
    digest = hashlib.blake2b(digest_size=8)
    keys = []
    for start in range(0, min(len(text), AFFINITY_BLOCK_CHARS * AFFINITY_MAX_BLOCKS), AFFINITY_BLOCK_CHARS):
        block = text[start : start + AFFINITY_BLOCK_CHARS]
        if len(block) < AFFINITY_BLOCK_CHARS:
            break
        digest.update(block.encode())
        keys.append(digest.copy().digest())
    return tuple(keys)


@dataclass(eq=False)
class Engine:
    url: str
    inflight_tokens: int = 0
    inflight_requests: int = 0
    cooldown_until: float = 0.0
    last_picked: int = 0  # a sequence number, for fair tie-breaking
    present: bool = True  # still in the discovered serving set


@dataclass(eq=False)
class Ticket:
    prompt_tokens: int
    max_tokens: int
    affinity: tuple[bytes, ...] = ()
    generated: int = 0
    prefilled: bool = False
    engine: Engine | None = None
    # Engines that failed this request: tried again only when no other is known.
    avoid: set[str] = field(default_factory=set)
    counted: int = 0  # what this ticket currently adds to queued_tokens
    counted_prompt: int = 0  # the prompt part of `counted`
    _waiter: asyncio.Future[Engine] | None = None

    @property
    def outstanding_prompt(self) -> int:
        return 0 if self.prefilled else self.prompt_tokens

    @property
    def outstanding(self) -> int:
        return self.outstanding_prompt + max(self.max_tokens - self.generated, 0)


class AdmissionController:
    def __init__(
        self,
        config: AdmissionConfig,
        *,
        engine_cooldown_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.engine_cooldown_seconds = engine_cooldown_seconds
        self._clock = clock
        self.engines: dict[str, Engine] = {}
        self._departed: set[Engine] = set()  # left the serving set, still finishing work
        self._queue: deque[Ticket] = deque()
        self._affinity: OrderedDict[bytes, str] = OrderedDict()
        self._pick_sequence = itertools.count(1)
        self.queued_tokens = 0
        self.queued_prompt_tokens = 0  # the part of queued_tokens not yet prefilled

    @property
    def queued_output_tokens(self) -> int:
        return self.queued_tokens - self.queued_prompt_tokens

    # --- what discovery tells us ---------------------------------------------

    def set_engines(self, urls: Iterable[str]) -> None:
        """Replace the serving set. An engine that left gets no new ticket;
        the tickets it holds finish (or fail over) on their own."""
        wanted = list(dict.fromkeys(urls))
        for url in list(self.engines):
            if url not in wanted:
                engine = self.engines.pop(url)
                engine.present = False
                if engine.inflight_requests:
                    self._departed.add(engine)
        for url in wanted:
            if url not in self.engines:
                self.engines[url] = Engine(url)
        self._dispatch()

    def mark_failed(self, engine: Engine) -> None:
        """Pass over an engine that just failed while others are available."""
        if self.engine_cooldown_seconds <= 0:
            return
        engine.cooldown_until = self._clock() + self.engine_cooldown_seconds
        # Waiting tickets may only fit the cooling engine: look again when it ends.
        asyncio.get_running_loop().call_later(self.engine_cooldown_seconds, self._dispatch)

    # --- a request's life ----------------------------------------------------

    async def admit(self, ticket: Ticket, *, retry: bool = False) -> Engine:
        """Wait for an engine with room for the ticket and assign it there.

        Raises QueueFull when the queue is full and Unavailable when no engine
        takes the ticket within the queue timeout. A retry skips the queue
        limit and goes to the front: it was admitted once already.
        """
        self._recount(ticket)
        if not self.engines and not self._departed and not self.config.queue_without_engines:
            raise Unavailable("No engine is serving this model right now.", code="no_engine")
        if retry or not self._queue:
            engine = self._pick(ticket)
            if engine is not None:
                self._assign(ticket, engine)
                return engine
        if not retry and len(self._queue) >= self.config.max_queued_requests:
            raise QueueFull(
                f"The gateway's queue is full ({self.config.max_queued_requests} requests waiting); retry later.",
                headers={"Retry-After": "1"},
            )
        ticket._waiter = asyncio.get_running_loop().create_future()
        if retry:
            self._queue.appendleft(ticket)
        else:
            self._queue.append(ticket)
        timeout, waiting_for = self.hold_timeout()
        try:
            async with asyncio.timeout(timeout):
                return await ticket._waiter
        except TimeoutError:
            if ticket.engine is not None:  # assigned in the same instant the clock ran out
                return ticket.engine
            raise Unavailable(
                f"No engine could take this request within {timeout:g} s{waiting_for}; retry later.",
                code="no_engine",
            ) from None
        finally:
            self._leave_queue(ticket)

    @property
    def cold(self) -> bool:
        """No engine serves at all (scaled to zero, or its only engine draining): one must start."""
        return not self.engines

    def hold_timeout(self) -> tuple[float, str]:
        """How long a request entering the queue now may wait, and what for (for the message).
        While cold the wait is for an engine to start: ``coldStartTimeoutSeconds``."""
        cold = self.config.cold_start_timeout_seconds
        if self.cold and cold is not None:
            return cold, " (no engine was running: scaled to zero, one is starting)"
        return self.config.queue_timeout_seconds, ""

    def progress(self, ticket: Ticket, generated: int) -> None:
        """The answer now holds ``generated`` tokens in all (the first one marks prefill done)."""
        ticket.prefilled = True
        ticket.generated = generated
        self._recount(ticket)
        if self._queue:  # less outstanding work may make room for the head of the queue
            self._dispatch()

    def requeue(self, ticket: Ticket, *, failed: Engine, prompt_tokens: int) -> None:
        """Detach a ticket from an engine that failed it; ``admit(retry=True)`` next.
        ``prompt_tokens`` is the prompt the next engine must prefill."""
        self._detach(ticket)
        ticket.avoid.add(failed.url)
        ticket.prompt_tokens = prompt_tokens
        ticket.prefilled = False
        self._recount(ticket)
        self.mark_failed(failed)

    def release(self, ticket: Ticket) -> None:
        """The request is over (done, failed or cancelled). Safe to call twice."""
        self._leave_queue(ticket)
        self._detach(ticket)
        self.queued_tokens -= ticket.counted
        self.queued_prompt_tokens -= ticket.counted_prompt
        ticket.counted = ticket.counted_prompt = 0
        self._dispatch()

    # --- internals -----------------------------------------------------------

    def _recount(self, ticket: Ticket) -> None:
        prompt = ticket.outstanding_prompt
        self.queued_prompt_tokens += prompt - ticket.counted_prompt
        ticket.counted_prompt = prompt
        outstanding = ticket.outstanding
        delta = outstanding - ticket.counted
        if delta:
            self.queued_tokens += delta
            if ticket.engine is not None:
                ticket.engine.inflight_tokens += delta
            ticket.counted = outstanding

    def _assign(self, ticket: Ticket, engine: Engine) -> None:
        ticket.engine = engine
        engine.inflight_requests += 1
        engine.inflight_tokens += ticket.counted
        engine.last_picked = next(self._pick_sequence)
        if self.config.prefix_affinity:
            for key in ticket.affinity:
                self._affinity[key] = engine.url
                self._affinity.move_to_end(key)
            while len(self._affinity) > AFFINITY_MAX_ENTRIES:
                self._affinity.popitem(last=False)

    def _detach(self, ticket: Ticket) -> None:
        engine = ticket.engine
        if engine is None:
            return
        ticket.engine = None
        engine.inflight_requests -= 1
        engine.inflight_tokens -= ticket.counted
        if not engine.present and not engine.inflight_requests:
            self._departed.discard(engine)

    def _leave_queue(self, ticket: Ticket) -> None:
        waiter, ticket._waiter = ticket._waiter, None
        if waiter is None:
            return
        if not waiter.done():
            waiter.cancel()
        try:
            self._queue.remove(ticket)
        except ValueError:
            pass  # already taken off by _dispatch

    def _fits(self, engine: Engine, ticket: Ticket) -> bool:
        if engine.inflight_requests >= self.config.max_inflight_requests_per_engine:
            return False
        if engine.inflight_requests == 0:
            return True
        return engine.inflight_tokens + ticket.counted <= self.config.max_inflight_tokens_per_engine

    def _pick(self, ticket: Ticket) -> Engine | None:
        engines = list(self.engines.values())
        now = self._clock()
        # Engines this request has not failed on and that have not failed lately;
        # failing that, those it has not failed on; failing that, any.
        pool = (
            [e for e in engines if e.url not in ticket.avoid and e.cooldown_until <= now]
            or [e for e in engines if e.url not in ticket.avoid]
            or engines
        )
        fitting = [e for e in pool if self._fits(e, ticket)]
        if not fitting:
            return None
        least = min(fitting, key=lambda e: (e.inflight_tokens, e.inflight_requests, e.last_picked))
        if self.config.prefix_affinity:
            for blocks, key in zip(range(len(ticket.affinity), 0, -1), reversed(ticket.affinity), strict=False):
                url = self._affinity.get(key)
                if url is None:
                    continue
                cached = next((e for e in fitting if e.url == url), None)
                saved_prefill = blocks * AFFINITY_BLOCK_CHARS // CHARS_PER_TOKEN
                if cached is not None and cached.inflight_tokens - least.inflight_tokens <= saved_prefill:
                    return cached
                break  # only the longest known prefix counts
        return least

    def _dispatch(self) -> None:
        while self._queue:
            ticket = self._queue[0]
            if ticket._waiter is None or ticket._waiter.done():
                self._queue.popleft()
                continue
            engine = self._pick(ticket)
            if engine is None:
                return  # arrival order: later tickets wait behind the head
            self._queue.popleft()
            self._assign(ticket, engine)
            ticket._waiter.set_result(engine)

    # --- what metrics and readiness read ---------------------------------------

    @property
    def waiting_requests(self) -> int:
        return len(self._queue)

    @property
    def inflight_requests(self) -> int:
        """Requests admitted to an engine or waiting for one."""
        engines = [*self.engines.values(), *self._departed]
        return sum(engine.inflight_requests for engine in engines) + len(self._queue)

    def engine_inflight_tokens(self) -> dict[str, int]:
        engines = [*self.engines.values(), *self._departed]
        return {engine.url: engine.inflight_tokens for engine in engines}

    def engines_by_state(self) -> dict[str, int]:
        now = self._clock()
        cooling = sum(1 for e in self.engines.values() if e.cooldown_until > now)
        return {
            "serving": len(self.engines) - cooling,
            "cooling_down": cooling,
            "departed_with_work": len(self._departed),
        }
