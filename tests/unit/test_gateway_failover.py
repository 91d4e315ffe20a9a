"""Failover with real engine processes: an engine killed or drained before the
first token or mid-answer, no engine left, and a client that walks away.

The engines share a seed, so every one writes the same answer to the same
conversation: a failed-over answer must equal, character for character, the
answer one healthy engine gives when asked directly.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from spotrag_box.testing import eventually_async, scrape_async
from spotrag_runtime.engine_emulator import start_engine_emulator

from .gateway_fixtures import SERVED_MODEL, RunningGateway, direct_answer, gateway_config, running_engines

QUESTION = [{"role": "user", "content": "Tell me about the night ferry to Kestrel Island."}]
# Answers far longer than max_tokens, so every answer here ends by length.
LONG_ANSWERS = {"answer_words_min": 400, "answer_words_max": 400}


def config(urls: list[str], **failover) -> object:
    return gateway_config(urls, retrieval={"enabled": False}, failover=failover)


async def engine_with_work(gateway: RunningGateway, engines: list) -> object:
    """The engine the gateway sent the request to (it has outstanding tokens)."""

    async def busy() -> object:
        for engine in engines:
            if await gateway.metric_async("spotrag_engine_inflight_tokens", engine=engine.url) > 0:
                return engine
        return None

    return await eventually_async(busy, what="the request to reach an engine")


async def test_an_engine_killed_before_the_first_token_is_invisible_to_the_client() -> None:
    with (
        running_engines(2, ttft_ms=800, **LONG_ANSWERS) as engines,
        RunningGateway(config([e.url for e in engines])) as gateway,
    ):
        async with gateway.async_client() as client:
            # The gateway answers only once the first token is there, so the
            # client is still waiting for its response when the engine dies.
            pending = asyncio.create_task(
                client.chat.completions.create(model=SERVED_MODEL, messages=QUESTION, max_tokens=30, stream=True)
            )
            victim = await engine_with_work(gateway, engines)
            victim.kill()
            stream = await pending
            chunks = [chunk async for chunk in stream]
        survivor = next(engine for engine in engines if engine is not victim)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == direct_answer(survivor, QUESTION, max_tokens=30)
        assert await gateway.metric_async("spotrag_retries_total") == 1
        assert await gateway.metric_async("spotrag_resumed_streams_total") == 0
        assert await gateway.metric_async("spotrag_requests_total", outcome="success") == 1
        assert await gateway.metric_async("spotrag_queued_tokens") == 0


@pytest.mark.parametrize("how", ["killed", "drained"])
async def test_a_stream_broken_mid_answer_is_resumed_as_one_uninterrupted_answer(how: str) -> None:
    with (
        running_engines(2, itl_ms=15, **LONG_ANSWERS) as engines,
        RunningGateway(config([e.url for e in engines])) as gateway,
    ):
        async with gateway.async_client() as client:
            stream = await client.chat.completions.create(
                model=SERVED_MODEL,
                messages=QUESTION,
                max_tokens=60,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 10:
                    victim = await engine_with_work(gateway, engines)
                    # SIGKILL: the node is gone. SIGTERM with no shutdown timeout: vLLM
                    # aborts its running requests and closes their streams.
                    victim.kill() if how == "killed" else victim.terminate()
        survivor = next(engine for engine in engines if engine is not victim)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == direct_answer(survivor, QUESTION, max_tokens=60)
        assert {chunk.id for chunk in chunks} == {chunks[0].id}
        assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.role) == 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 60
        assert await gateway.metric_async("spotrag_resumed_streams_total") == 1
        assert await gateway.metric_async("spotrag_requests_total", outcome="success") == 1
        assert await gateway.metric_async("spotrag_queued_tokens") == 0


async def test_a_stream_whose_engine_drain_runs_out_is_resumed_not_left_frozen() -> None:
    # vLLM 0.26 whose --shutdown-timeout runs out mid-answer stops sending but keeps
    # the connection open; the gateway's read timeout (15 minutes here) would freeze
    # the answer, and the client gives up after 30 s of silence: only the stall watch
    # (a 2 s floor) gets the answer through.
    with (
        running_engines(2, itl_ms=15, shutdown_timeout=0.3, **LONG_ANSWERS) as engines,
        RunningGateway(config([e.url for e in engines], readTimeoutSeconds=900)) as gateway,
    ):
        async with gateway.async_client(timeout=30) as client:
            stream = await client.chat.completions.create(
                model=SERVED_MODEL, messages=QUESTION, max_tokens=200, stream=True
            )
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 10:
                    victim = await engine_with_work(gateway, engines)
                    victim.terminate()  # 200 tokens take ~3 s: the 0.3 s drain runs out
        survivor = next(engine for engine in engines if engine is not victim)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == direct_answer(survivor, QUESTION, max_tokens=200)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        # Resumed because the stream stalled (not because the read timeout ran out).
        assert await gateway.metric_async("spotrag_stalled_streams_total") == 1
        assert await gateway.metric_async("spotrag_resumed_streams_total") == 1
        assert await gateway.metric_async("spotrag_requests_total", outcome="success") == 1
        assert await gateway.metric_async("spotrag_queued_tokens") == 0
        # The gateway dropped the stalled connection, so that vLLM could exit.
        assert await asyncio.to_thread(victim.wait, 10) == 0


async def test_a_refused_connection_is_an_engine_not_serving_not_a_failed_attempt() -> None:
    # Listed first, so the first pick: vLLM refuses connections while it loads.
    loading = start_engine_emulator(served_model_name=SERVED_MODEL, startup_delay=300)
    try:
        with running_engines(1, **LONG_ANSWERS) as (serving,):
            urls = [loading.url, serving.url]
            settings = {"retrieval": {"enabled": False}, "admission": {"tokenCounting": "estimate"}}
            with RunningGateway(gateway_config(urls, failover={"maxAttempts": 1}, **settings)) as gateway:
                async with gateway.async_client() as client:
                    reply = await client.chat.completions.create(model=SERVED_MODEL, messages=QUESTION, max_tokens=20)
                assert reply.choices[0].message.content == direct_answer(serving, QUESTION, max_tokens=20)
                assert await gateway.metric_async("spotrag_retries_total") == 1
                assert await gateway.metric_async("spotrag_requests_total", outcome="success") == 1
            # When every engine refuses, the request still fails rather than going round.
            with RunningGateway(gateway_config([loading.url], failover={"maxAttempts": 1}, **settings)) as gateway:
                async with gateway.async_client() as client:
                    with pytest.raises(openai.APIStatusError) as refused:
                        await client.chat.completions.create(model=SERVED_MODEL, messages=QUESTION, max_tokens=5)
                assert refused.value.status_code == 502
    finally:
        loading.kill()
        loading.wait()


async def test_with_no_engine_left_a_broken_stream_ends_with_an_error_event_not_a_hang() -> None:
    with running_engines(1, itl_ms=30, **LONG_ANSWERS) as (engine,), RunningGateway(config([engine.url])) as gateway:
        async with gateway.async_client() as client:
            stream = await client.chat.completions.create(
                model=SERVED_MODEL, messages=QUESTION, max_tokens=60, stream=True
            )
            received = 0
            with pytest.raises(openai.APIError) as raised:
                async for _ in stream:
                    received += 1
                    if received == 5:
                        engine.kill()
            assert "3 engine attempt(s) in a row" in raised.value.message
            # Once nothing can serve at all, a new request is refused before it starts.
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(model=SERVED_MODEL, messages=QUESTION, max_tokens=5)
            assert refused.value.status_code == 502
            assert refused.value.body["code"] == "engines_failed"
        assert await gateway.metric_async("spotrag_requests_total", outcome="engine_failed") == 2
        assert await gateway.metric_async("spotrag_queued_tokens") == 0


async def engine_metric(engine, name: str, **labels: str) -> float:
    return (await scrape_async(f"{engine.url}/metrics")).value(name, **labels)


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_client_that_goes_away_cancels_its_request_on_the_engine(streaming: bool) -> None:
    with running_engines(1, itl_ms=30, **LONG_ANSWERS) as (engine,), RunningGateway(config([engine.url])) as gateway:
        body = {"model": SERVED_MODEL, "messages": QUESTION, "max_tokens": 300, "stream": streaming}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            if streaming:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = 0
                    async for line in response.aiter_lines():
                        lines += line.startswith("data:")
                        if lines == 5:
                            break  # leaving the block closes the connection
            else:
                request = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                await eventually_async(
                    lambda: engine_metric(engine, "vllm:generation_tokens_total"), what="some tokens into the answer"
                )
                request.cancel()  # the client gives up: its connection closes
                with pytest.raises(asyncio.CancelledError):
                    await request

        async def engine_settled() -> bool:
            return await engine_metric(engine, "vllm:num_requests_running") == 0

        await eventually_async(engine_settled, what="the engine to drop the request")
        assert await engine_metric(engine, "vllm:request_success_total", finished_reason="abort") == 1
        # The engine stopped early: far fewer than the 300 tokens it was asked for.
        assert await engine_metric(engine, "vllm:generation_tokens_total") < 150
        await eventually_async(
            lambda: gateway.metric_async("spotrag_requests_total", outcome="cancelled"), what="the gateway to count it"
        )
        assert await gateway.metric_async("spotrag_queued_tokens") == 0


def test_the_stall_bound_follows_the_streams_own_inter_token_p99_above_a_floor() -> None:
    from spotrag_runtime.gateway.config import FailoverConfig
    from spotrag_runtime.gateway.relay import _StallWatch

    watch = _StallWatch(FailoverConfig(stall_timeout_seconds=2.0, stall_itl_multiplier=10.0), max_tokens=1000)
    assert watch.bound == 2.0  # no gap seen yet: the floor
    for _ in range(198):
        watch.observe(0.5)  # a slow engine: half a second a token
    watch.observe(30.0)  # one prefill stall, an outlier above the p99
    assert watch.p99 == 0.5 and watch.bound == 5.0
    watch.observe(0.01)
    watch.observe(0.01)
    assert watch.bound == 5.0  # fast gaps do not pull the p99 under the slow ones
