"""The token-aware queue seen from outside: exact queued tokens under a burst,
least-outstanding picking across two engines, 429 when the queue is full and
503 when no engine takes a request in time.

The engines hold every request for 1.5 s before its first token, so the
points where the tests read the gauges are still: nothing is prefilled and
nothing finishes while they look.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from spotrag_box.testing import eventually_async, scrape_async

from .gateway_fixtures import SERVED_MODEL, RunningGateway, gateway_config, running_engines, tokenize_count

STALL_MS = 1500  # time to first token of the engines here: longer than the tests look


def plain_config(urls: list[str], **admission) -> object:
    return gateway_config(
        urls,
        retrieval={"enabled": False},
        # Exact before the first token: every prompt counted by the engine's /tokenize.
        admission={"prefixAffinity": False, "tokenCounting": "engine", **admission},
    )


async def stream_text(client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int) -> str:
    stream = await client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=max_tokens, stream=True
    )
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


async def test_queued_tokens_are_exact_while_a_burst_waits_and_zero_after() -> None:
    with (
        running_engines(1, ttft_ms=STALL_MS) as (engine,),
        RunningGateway(plain_config([engine.url], maxInflightRequestsPerEngine=2)) as gateway,
    ):
        burst = [([{"role": "user", "content": "tell me " + "about ferries " * i}], 20 + 10 * i) for i in range(4)]
        costs = [tokenize_count(engine, messages) + max_tokens for messages, max_tokens in burst]
        async with gateway.async_client() as client:
            tasks = []
            for number, (messages, max_tokens) in enumerate(burst, start=1):
                tasks.append(asyncio.create_task(stream_text(client, messages, max_tokens)))
                # Each request is counted from the moment it asks for admission.
                await eventually_async(
                    lambda n=number: _equals(gateway, "spotrag_queued_tokens", sum(costs[:n])),
                    what=f"request {number} to be counted",
                )
            # Two admitted to the engine (its budget), two waiting; nothing prefilled yet.
            assert await gateway.metric_async("spotrag_queued_tokens") == sum(costs)
            assert await gateway.metric_async("spotrag_engine_inflight_tokens", engine=engine.url) == sum(costs[:2])
            assert await gateway.metric_async("spotrag_waiting_requests") == 2
            answers = await asyncio.gather(*tasks)
        assert all(answers)
        assert await gateway.metric_async("spotrag_queued_tokens") == 0
        assert await gateway.metric_async("spotrag_engine_inflight_tokens", engine=engine.url) == 0
        assert await gateway.metric_async("spotrag_requests_total", outcome="success") == 4


async def _equals(gateway: RunningGateway, name: str, expected: float, **labels: str) -> bool:
    return await gateway.metric_async(name, **labels) == expected


async def test_requests_go_to_the_engine_with_the_least_outstanding_tokens() -> None:
    with (
        running_engines(2, ttft_ms=STALL_MS) as engines,
        RunningGateway(plain_config([engine.url for engine in engines])) as gateway,
    ):
        first, second = engines
        question = [{"role": "user", "content": "Which ship is the oldest?"}]
        prompt = tokenize_count(first, question)
        async with gateway.async_client() as client:
            tasks = [asyncio.create_task(stream_text(client, question, 400))]
            await eventually_async(
                lambda: _equals(gateway, "spotrag_queued_tokens", prompt + 400), what="the long request"
            )
            for count in range(1, 4):
                tasks.append(asyncio.create_task(stream_text(client, question, 50)))
                await eventually_async(
                    lambda c=count: _equals(gateway, "spotrag_queued_tokens", prompt + 400 + c * (prompt + 50)),
                    what=f"short request {count}",
                )
            # All three short ones went to the second engine: even with three of
            # them it holds fewer outstanding tokens than the first.
            assert await gateway.metric_async("spotrag_engine_inflight_tokens", engine=first.url) == prompt + 400
            assert await gateway.metric_async("spotrag_engine_inflight_tokens", engine=second.url) == 3 * (prompt + 50)

            # The engines agree on where the requests are.
            async def engine_requests(engine) -> float:
                running = (await scrape_async(f"{engine.url}/metrics")).value("vllm:num_requests_running")
                waiting = (await scrape_async(f"{engine.url}/metrics")).value("vllm:num_requests_waiting")
                return running + waiting

            assert [await engine_requests(first), await engine_requests(second)] == [1, 3]
            texts = await asyncio.gather(*tasks)
        # Same seed, same question: both engines write the same answer.
        assert texts[1] == texts[2] == texts[3] and texts[0].startswith(texts[1])


async def test_a_full_queue_answers_429_and_a_request_no_engine_takes_in_time_503() -> None:
    with (
        running_engines(1, ttft_ms=2 * STALL_MS) as (engine,),
        RunningGateway(
            plain_config([engine.url], maxInflightRequestsPerEngine=1, maxQueuedRequests=1, queueTimeoutSeconds=0.3)
        ) as gateway,
    ):
        question = [{"role": "user", "content": "hello"}]
        cost = tokenize_count(engine, question) + 5
        async with gateway.async_client() as client:
            holder = asyncio.create_task(stream_text(client, question, 5))
            await eventually_async(
                lambda: _equals(gateway, "spotrag_engine_inflight_tokens", cost, engine=engine.url),
                what="the first request to be admitted",
            )
            waiter = asyncio.create_task(
                client.chat.completions.create(model=SERVED_MODEL, messages=question, max_tokens=5)
            )
            await eventually_async(lambda: _equals(gateway, "spotrag_waiting_requests", 1), what="the second to wait")
            with pytest.raises(openai.RateLimitError) as full:
                await client.chat.completions.create(model=SERVED_MODEL, messages=question, max_tokens=5)
            assert full.value.response.headers["Retry-After"] == "1"
            assert full.value.body["code"] == "queue_full"
            # The engine holds its only slot for 3 s; the waiter's 0.3 s run out first.
            with pytest.raises(openai.InternalServerError) as unavailable:
                await waiter
            assert unavailable.value.status_code == 503
            assert unavailable.value.body["code"] == "no_engine"
            assert "within 0.3 s" in unavailable.value.body["message"]
            assert await holder
        assert gateway.metric("spotrag_requests_total", outcome="queue_full") == 1
        assert gateway.metric("spotrag_requests_total", outcome="unavailable") == 1
        assert gateway.metric("spotrag_queued_tokens") == 0


def test_with_no_engine_the_gateway_is_not_ready_and_requests_fail_at_once() -> None:
    with RunningGateway(plain_config([])) as gateway:
        ready = httpx.get(f"{gateway.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["message"] == "Not ready: no engine is serving."
        with gateway.client() as client, pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(
                model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        assert raised.value.status_code == 503 and raised.value.body["code"] == "no_engine"


async def test_by_default_a_prompt_is_estimated_and_the_engines_count_corrects_it() -> None:
    # tokenCounting auto: admitted on an estimate (no /tokenize before the first token);
    # the engine's first usage chunk gives the exact count, which the client's usage
    # carries and the next estimates learn from.
    with (
        running_engines(1, ttft_ms=STALL_MS) as (engine,),
        RunningGateway(gateway_config([engine.url], retrieval={"enabled": False})) as gateway,
    ):
        question = [{"role": "user", "content": "tell me about the ferries of the northern isles " * 12}]
        exact = tokenize_count(engine, question)
        estimates = []
        async with gateway.async_client() as client:
            for _ in range(3):
                answer = asyncio.create_task(
                    client.chat.completions.create(model=SERVED_MODEL, messages=question, max_tokens=5)
                )
                await eventually_async(lambda: _positive(gateway, "spotrag_queued_prompt_tokens"), what="admission")
                estimates.append(await gateway.metric_async("spotrag_queued_prompt_tokens"))
                assert (await answer).usage.prompt_tokens == exact
        assert await gateway.metric_async("spotrag_queued_tokens") == 0
    assert estimates[0] != exact
    errors = [abs(estimate - exact) for estimate in estimates]
    assert errors[2] < errors[1] < errors[0]


async def _positive(gateway: RunningGateway, name: str) -> bool:
    return await gateway.metric_async(name) > 0


async def test_while_scaled_to_zero_a_stream_is_kept_alive_with_comments_until_the_hold_runs_out() -> None:
    config = plain_config([], queueWithoutEngines=True, coldStartTimeoutSeconds=1, keepAliveSeconds=0.1)
    with RunningGateway(config) as gateway:
        request = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hello?"}], "stream": True}
        async with (
            httpx.AsyncClient(timeout=30) as http,
            http.stream("POST", f"{gateway.url}/v1/chat/completions", json=request) as response,
        ):
            assert response.status_code == 200  # answered before any engine exists: proxies see bytes
            lines = [line async for line in response.aiter_lines() if line]
        comments = [line for line in lines if line.startswith(":")]
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert comments and set(comments) == {": waiting for an engine"}
        assert lines.index(comments[0]) == 0  # the comments come before anything else
        error = json.loads(data[0])["error"]
        assert error["code"] == "no_engine" and "scaled to zero" in error["message"]
        assert data[-1] == "[DONE]"
        assert await gateway.metric_async("spotrag_requests_total", outcome="unavailable") == 1
        assert await gateway.metric_async("spotrag_queued_tokens") == 0
