"""The admission controller on its own: queued-token accounting at exact
points, the per-engine budget, arrival order, least-outstanding picking,
prefix affinity, failover bookkeeping and serving-set changes."""

from __future__ import annotations

import asyncio

import pytest

from spotrag_box.testing import eventually_async
from spotrag_runtime.gateway.config import AdmissionConfig
from spotrag_runtime.gateway.errors import QueueFull, Unavailable
from spotrag_runtime.gateway.token_queue import (
    AFFINITY_BLOCK_CHARS,
    AdmissionController,
    Ticket,
    prefix_keys,
)

A, B = "http://engine-a:8000", "http://engine-b:8000"


class FakeClock:
    """Time that moves only when the test says so (for cooldowns)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(engines=(A, B), clock=None, **admission) -> AdmissionController:
    admission.setdefault("prefix_affinity", False)
    control = AdmissionController(AdmissionConfig(**admission), engine_cooldown_seconds=5.0, clock=clock or FakeClock())
    control.set_engines(engines)
    return control


async def waiting(control: AdmissionController, ticket: Ticket) -> asyncio.Task:
    """Start admitting a ticket that will have to wait, and let it reach the queue."""
    queued = control.waiting_requests + 1
    task = asyncio.create_task(control.admit(ticket))
    await eventually_async(lambda: control.waiting_requests == queued, what="the ticket to queue")
    assert not task.done()
    return task


async def test_queued_tokens_follow_a_request_from_arrival_to_the_end() -> None:
    control = controller(engines=(A,))
    ticket = Ticket(prompt_tokens=100, max_tokens=50)
    engine = await control.admit(ticket)
    # Admitted, nothing prefilled: the whole prompt plus every allowed output token.
    assert control.queued_tokens == 150
    assert control.engine_inflight_tokens() == {A: 150}
    control.progress(ticket, 1)  # the first token: prefill is done
    assert control.queued_tokens == 49
    control.progress(ticket, 20)
    assert control.queued_tokens == 30
    assert engine.inflight_tokens == 30 and engine.inflight_requests == 1
    control.release(ticket)  # finished early (stop token): nothing is left
    assert control.queued_tokens == 0
    assert control.engine_inflight_tokens() == {A: 0}
    control.release(ticket)  # twice is harmless
    assert control.queued_tokens == 0


async def test_a_burst_is_counted_while_it_waits_and_admitted_in_arrival_order() -> None:
    control = controller(engines=(A,), max_inflight_requests_per_engine=2)
    tickets = [Ticket(prompt_tokens=10 * (i + 1), max_tokens=100) for i in range(5)]
    await control.admit(tickets[0])
    await control.admit(tickets[1])
    tasks = [await waiting(control, ticket) for ticket in tickets[2:]]
    # Waiting tickets count too: the operator must see demand that has no engine yet.
    assert control.queued_tokens == sum(10 * (i + 1) + 100 for i in range(5)) == 650
    assert control.waiting_requests == 3
    assert control.engine_inflight_tokens() == {A: 110 + 120}
    control.progress(tickets[0], 100)
    assert control.queued_tokens == 650 - 110
    control.release(tickets[0])
    await eventually_async(tasks[0].done, what="a waiting ticket to be admitted")
    assert [task.done() for task in tasks] == [True, False, False]  # the oldest first
    control.release(tickets[1])
    await eventually_async(tasks[1].done, what="the next waiting ticket to be admitted")
    assert [task.done() for task in tasks] == [True, True, False]
    assert control.queued_tokens == 130 + 140 + 150
    for ticket in tickets[2:4]:
        control.release(ticket)
    await tasks[2]
    control.release(tickets[4])
    assert control.queued_tokens == 0 and control.waiting_requests == 0


async def test_the_token_budget_holds_tickets_back_but_an_idle_engine_takes_any() -> None:
    control = controller(engines=(A,), max_inflight_tokens_per_engine=1000)
    big = Ticket(prompt_tokens=900, max_tokens=400)  # alone it exceeds the budget
    await control.admit(big)  # an idle engine takes it anyway, or it would wait forever
    small = Ticket(prompt_tokens=10, max_tokens=10)
    task = await waiting(control, small)
    control.progress(big, 1)  # prefilled: 399 left, and 399 + 20 fits
    await eventually_async(task.done, what="the small ticket to be admitted")
    assert small.engine is big.engine


async def test_the_engine_with_least_outstanding_tokens_is_picked() -> None:
    control = controller()
    long_answer = Ticket(prompt_tokens=50, max_tokens=500)
    assert (await control.admit(long_answer)).url == A  # a tie: the one picked least recently
    shorts = [Ticket(prompt_tokens=50, max_tokens=50) for _ in range(4)]
    picked = [(await control.admit(ticket)).url for ticket in shorts]
    # B holds 100, 200, 300 after each; the fourth sees A 550 vs B 300: B again.
    assert picked == [B, B, B, B]
    assert control.engine_inflight_tokens() == {A: 550, B: 400}
    control.progress(long_answer, 500)  # A's answer is almost done
    fifth = Ticket(prompt_tokens=50, max_tokens=50)
    assert (await control.admit(fifth)).url == A


async def test_prefix_affinity_goes_back_to_the_engine_that_cached_the_prefix() -> None:
    control = controller(prefix_affinity=True)
    shared = "s" * (AFFINITY_BLOCK_CHARS * 8)  # a long shared system prompt: 8 blocks = 512 tokens saved
    first = Ticket(prompt_tokens=600, max_tokens=100, affinity=prefix_keys(shared + "question one"))
    assert (await control.admit(first)).url == A
    second = Ticket(prompt_tokens=600, max_tokens=100, affinity=prefix_keys(shared + "question two"))
    # A has 700 outstanding, B 0: the 512 prefill tokens saved on A do not pay for 700 more waiting.
    assert (await control.admit(second)).url == B
    control.progress(first, 100)  # A is nearly idle now
    control.progress(second, 1)  # B: 99 outstanding
    third = Ticket(prompt_tokens=600, max_tokens=100, affinity=prefix_keys(shared + "question three"))
    # A and B both cached the prefix; the most recent holder is B, 99 ahead of A's 0: worth it.
    assert (await control.admit(third)).url == B
    unrelated = Ticket(prompt_tokens=600, max_tokens=100, affinity=prefix_keys("u" * AFFINITY_BLOCK_CHARS * 8))
    assert (await control.admit(unrelated)).url == A  # no shared prefix: least outstanding


def test_prefix_keys_are_shared_exactly_by_shared_whole_blocks() -> None:
    one = prefix_keys("a" * AFFINITY_BLOCK_CHARS * 2 + "b" * AFFINITY_BLOCK_CHARS)
    two = prefix_keys("a" * AFFINITY_BLOCK_CHARS * 2 + "c" * AFFINITY_BLOCK_CHARS)
    assert len(one) == len(two) == 3
    assert one[:2] == two[:2] and one[2] != two[2]
    assert prefix_keys("a" * (AFFINITY_BLOCK_CHARS - 1)) == ()


async def test_a_full_queue_refuses_with_429_and_the_refused_ticket_counts_nothing() -> None:
    control = controller(engines=(A,), max_inflight_requests_per_engine=1, max_queued_requests=1)
    holder = Ticket(prompt_tokens=10, max_tokens=10)
    await control.admit(holder)
    queued = Ticket(prompt_tokens=10, max_tokens=10)
    task = await waiting(control, queued)
    refused = Ticket(prompt_tokens=10, max_tokens=10)
    with pytest.raises(QueueFull) as raised:
        await control.admit(refused)
    control.release(refused)  # what every caller does in its finally
    assert raised.value.status == 429 and raised.value.headers == {"Retry-After": "1"}
    assert control.queued_tokens == 40
    control.release(holder)
    await task
    control.release(queued)


async def test_no_engine_within_the_queue_timeout_is_503_and_leaves_no_trace() -> None:
    control = controller(engines=(A,), max_inflight_requests_per_engine=1, queue_timeout_seconds=0.05)
    await control.admit(Ticket(prompt_tokens=10, max_tokens=10))
    late = Ticket(prompt_tokens=5, max_tokens=5)
    with pytest.raises(Unavailable, match="within 0.05 s"):
        await control.admit(late)
    control.release(late)
    assert control.waiting_requests == 0 and control.queued_tokens == 20


async def test_with_no_engine_at_all_requests_fail_at_once_unless_queuing_is_allowed() -> None:
    control = controller(engines=())
    with pytest.raises(Unavailable, match="No engine is serving"):
        await control.admit(Ticket(prompt_tokens=1, max_tokens=1))
    patient = controller(engines=(), queue_without_engines=True)
    ticket = Ticket(prompt_tokens=1, max_tokens=1)
    task = await waiting(patient, ticket)
    assert patient.queued_tokens == 2  # demand is visible while engines scale from zero
    patient.set_engines([A])
    assert (await task).url == A


async def test_an_engine_that_leaves_gets_nothing_new_but_finishes_what_it_has() -> None:
    control = controller()
    on_a = Ticket(prompt_tokens=10, max_tokens=10)
    assert (await control.admit(on_a)).url == A
    control.set_engines([B])  # A is drained: out of the serving set
    assert control.engines_by_state() == {"serving": 1, "cooling_down": 0, "departed_with_work": 1}
    for _ in range(3):
        assert (await control.admit(Ticket(prompt_tokens=10, max_tokens=10))).url == B
    assert control.engine_inflight_tokens()[A] == 20
    control.release(on_a)
    assert A not in control.engine_inflight_tokens()
    assert control.engines_by_state()["departed_with_work"] == 0


async def test_a_failed_attempt_requeues_at_the_front_avoiding_the_engine_that_failed() -> None:
    clock = FakeClock()
    control = controller(clock=clock, max_inflight_requests_per_engine=1)
    broken = Ticket(prompt_tokens=100, max_tokens=50)
    engine_a = await control.admit(broken)
    other = Ticket(prompt_tokens=10, max_tokens=10)
    assert (await control.admit(other)).url == B
    newcomer = Ticket(prompt_tokens=10, max_tokens=10)
    newcomer_task = await waiting(control, newcomer)
    control.progress(broken, 20)  # 20 tokens streamed, then A died
    control.requeue(broken, failed=engine_a, prompt_tokens=120)
    # The next engine prefills the prompt and the partial answer again.
    assert broken.outstanding == 120 + 30
    assert control.queued_tokens == 150 + 20 + 20
    retry_task = asyncio.create_task(control.admit(broken, retry=True))
    # A is cooling down and B is busy: the retry waits, at the head of the queue.
    await eventually_async(lambda: control.waiting_requests == 2, what="the retry to queue")
    assert not retry_task.done()
    control.release(other)
    await eventually_async(retry_task.done, what="the retry to be admitted")
    assert (await retry_task).url == B
    assert not newcomer_task.done()
    clock.now += 5.0  # A's cooldown is over
    control.set_engines([A, B])  # any change makes the controller look again
    assert (await newcomer_task).url == A
    for ticket in (broken, newcomer):
        control.release(ticket)
    assert control.queued_tokens == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    control = controller(engines=(A,), max_inflight_requests_per_engine=1)
    holder = Ticket(prompt_tokens=10, max_tokens=10)
    await control.admit(holder)
    gone = Ticket(prompt_tokens=30, max_tokens=30)
    task = await waiting(control, gone)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    control.release(gone)
    assert control.waiting_requests == 0 and control.queued_tokens == 20
    control.release(holder)
    assert control.engine_inflight_tokens() == {A: 0}


async def test_queued_tokens_split_into_prompt_and_output_parts_that_add_up() -> None:
    control = controller(engines=(A,))
    ticket = Ticket(prompt_tokens=100, max_tokens=50)
    engine = await control.admit(ticket)
    parts = [(control.queued_prompt_tokens, control.queued_output_tokens, control.queued_tokens)]
    control.progress(ticket, 1)  # prefilled: the prompt part goes, the output part counts down
    parts.append((control.queued_prompt_tokens, control.queued_output_tokens, control.queued_tokens))
    control.requeue(ticket, failed=engine, prompt_tokens=101)  # resumed elsewhere: the answer so far is prompt again
    parts.append((control.queued_prompt_tokens, control.queued_output_tokens, control.queued_tokens))
    control.release(ticket)
    parts.append((control.queued_prompt_tokens, control.queued_output_tokens, control.queued_tokens))
    assert parts == [(100, 50, 150), (0, 49, 49), (101, 49, 150), (0, 0, 0)]


def test_the_gateway_exports_both_parts_of_queued_tokens() -> None:
    from prometheus_client import generate_latest

    from spotrag_runtime.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.live.queued_tokens = lambda: 150
    metrics.live.queued_prompt_tokens = lambda: 100
    text = generate_latest(metrics.registry).decode()
    assert "spotrag_queued_tokens 150.0" in text
    assert "spotrag_queued_prompt_tokens 100.0" in text
    assert "spotrag_queued_output_tokens 50.0" in text


async def test_while_scaled_to_zero_a_request_is_held_for_the_cold_start_timeout_not_the_queue_timeout() -> None:
    control = controller(
        engines=(), queue_without_engines=True, queue_timeout_seconds=0.01, cold_start_timeout_seconds=60
    )
    assert control.cold and control.hold_timeout()[0] == 60
    ticket = Ticket(prompt_tokens=3, max_tokens=4)
    task = await waiting(control, ticket)
    assert control.queued_tokens == 7  # the operator's signal to start an engine
    control.set_engines([A])  # the engine started and joined the serving set
    assert (await task).url == A
    assert not control.cold and control.hold_timeout()[0] == 0.01


async def test_a_cold_hold_that_runs_out_says_no_engine_was_running() -> None:
    control = controller(engines=(), queue_without_engines=True, cold_start_timeout_seconds=0.01)
    late = Ticket(prompt_tokens=1, max_tokens=1)
    with pytest.raises(Unavailable, match="scaled to zero"):
        await control.admit(late)
    control.release(late)
    assert control.queued_tokens == 0 and control.waiting_requests == 0


async def test_a_request_arriving_while_the_only_engine_drains_is_held_and_answered_by_the_next() -> None:
    control = controller(engines=(A,), queue_without_engines=True, cold_start_timeout_seconds=60)
    running = Ticket(prompt_tokens=5, max_tokens=5)
    assert (await control.admit(running)).url == A
    control.set_engines([])  # A drains (scale to zero); its answer goes on there
    newcomer = Ticket(prompt_tokens=2, max_tokens=2)
    task = await waiting(control, newcomer)
    control.set_engines([B])  # the next engine
    assert (await task).url == B
    control.release(running)
    control.release(newcomer)
    assert control.queued_tokens == 0
