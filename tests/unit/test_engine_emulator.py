"""The engine emulator, as its users see it: a separate process on 127.0.0.1
spoken to with the official openai client (sync and async) and plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

from spotrag_box.testing import eventually, scrape
from spotrag_runtime.engine_emulator import EmulatorProcess, start_engine_emulator
from spotrag_runtime.engine_emulator.metrics import one_two_five_buckets
from spotrag_runtime.engine_emulator.text import count_tokens, quotes

MODEL = "emu-model"
QUESTION = [{"role": "user", "content": "Where is the tower?"}]
RAG_PROMPT = (
    "Answer from the contexts and cite them.\n"
    "[1] The tower stands in Paris, by the river. It was built in 1889.\n"
    "[2] Bridges cross the river in many places.\n"
    "Question: where is the tower?"
)


def started(**options: object) -> EmulatorProcess:
    engine = start_engine_emulator(served_model_name=MODEL, **options)
    try:
        engine.wait_ready()
    except BaseException:
        engine.kill()
        engine.wait()
        raise
    return engine


# Fast clock and short answers: these tests check behaviour, not speed.
FAST_ENGINE = {
    "seed": 7,
    "ttft_ms": 1,
    "itl_ms": 1,
    "max_model_len": 256,
    "block_size": 16,
    "num_gpu_blocks": 64,
    "answer_words_min": 12,
    "answer_words_max": 30,
}


@pytest.fixture(scope="module")
def engine() -> Iterator[EmulatorProcess]:
    with started(**FAST_ENGINE) as process:
        yield process


@pytest.fixture(scope="module")
def twin_engine() -> Iterator[EmulatorProcess]:
    """A second engine with the same seed: where a broken stream is resumed."""
    with started(**FAST_ENGINE) as process:
        yield process


@pytest.fixture(scope="module")
def narrow_engine() -> Iterator[EmulatorProcess]:
    """Two batch slots and a slow clock, so requests pile up and stay put."""
    with started(seed=1, max_num_seqs=2, ttft_ms=1, itl_ms=20) as process:
        yield process


def client(engine: EmulatorProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)


def async_client(engine: EmulatorProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)


def metric(engine: EmulatorProcess, name: str, **labels: str) -> float:
    samples = scrape(engine.url + "/metrics").find(name, **labels)
    assert samples, f"{name}{labels} not in /metrics"
    return sum(sample.value for sample in samples)


def stream_chat(engine: EmulatorProcess, messages: list[dict], **params: object) -> tuple[list[str], str, object]:
    """The content deltas, the finish reason and the usage of one streamed chat."""
    with client(engine) as api:
        stream = api.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **params
        )
        deltas, finish_reason, usage, roles = [], None, None, []
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    deltas.append(choice.delta.content)
                finish_reason = choice.finish_reason or finish_reason
    assert roles == ["assistant"]
    return deltas, finish_reason, usage


# -- generation ----------------------------------------------------------------


def test_chat_stream_and_whole_answer_agree(engine: EmulatorProcess) -> None:
    deltas, finish_reason, usage = stream_chat(engine, QUESTION, max_tokens=8)
    with client(engine) as api:
        whole = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)

    assert finish_reason == "length" == whole.choices[0].finish_reason
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) == 8 == usage.completion_tokens == whole.usage.completion_tokens
    assert count_tokens("".join(deltas)) == 8
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + 8
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL


def test_answer_stops_at_its_natural_end_unless_told_to_go_on(engine: EmulatorProcess) -> None:
    with client(engine) as api:
        natural = api.chat.completions.create(model=MODEL, messages=QUESTION)
        forced = api.chat.completions.create(
            model=MODEL, messages=QUESTION, max_completion_tokens=50, extra_body={"ignore_eos": True}
        )

    assert natural.choices[0].finish_reason == "stop"
    assert 12 <= natural.usage.completion_tokens <= 30
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage.completion_tokens == 50
    # The answer is one word stream: going past EOS extends it.
    assert forced.choices[0].message.content.startswith(natural.choices[0].message.content + " ")


def test_answer_quotes_the_reference_sentence_that_matches_the_question(engine: EmulatorProcess) -> None:
    with client(engine) as api:
        reply = api.chat.completions.create(
            model=MODEL, max_tokens=20, messages=[{"role": "user", "content": RAG_PROMPT}]
        )
    assert reply.choices[0].message.content.startswith(
        "Emulated answer, quoting the references: The tower stands in Paris, by the river [1]."
    )


@pytest.mark.parametrize(
    ("prompt", "quoted"),
    [
        # The sentence with the question's words comes first, whatever its reference.
        (
            "References:\n[1] Bridges cross the river. Boats are slow.\n\n[2] The tower is tall. It is old.\n\n"
            "Question: How tall is the tower?",
            ["The tower is tall [2].", "Bridges cross the river [1].", "Boats are slow [1].", "It is old [2]."],
        ),
        # Headings are not sentences; a sentence without a stop gets one; "[1]:" is a marker too.
        (
            "[1]: # Title\nParis has a tower!  More text\nQuestion: a tower?",
            ["Paris has a tower [1]!", "More text [1]."],
        ),
        # Japanese has no spaces: matched by character pairs, cited after the full stop.
        (
            "[1] 台風の日は欠航します。運賃は戻ります。\nQuestion: 台風の日は?",
            ["台風の日は欠航します。 [1]", "運賃は戻ります。 [1]"],
        ),
        ("A reference like [1] inside a sentence is not a reference.", []),
        ("[2] Numbering that does not start at 1 is not references.", []),
    ],
)
def test_quotes_rank_reference_sentences_by_the_question(prompt: str, quoted: list[str]) -> None:
    assert [" ".join(quote.words) for quote in quotes(prompt)] == quoted


def test_without_references_the_answer_says_it_is_filler(engine: EmulatorProcess) -> None:
    with client(engine) as api:
        reply = api.chat.completions.create(model=MODEL, max_tokens=8, messages=QUESTION)
    assert reply.choices[0].message.content.startswith("Emulated answer, without references: ")


def test_text_is_a_function_of_seed_and_conversation(
    engine: EmulatorProcess, twin_engine: EmulatorProcess, narrow_engine: EmulatorProcess
) -> None:
    def text(on: EmulatorProcess, content: str) -> str:
        with client(on) as api:
            return (
                api.chat.completions.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": content}])
                .choices[0]
                .message.content
            )

    assert text(engine, "hello") == text(twin_engine, "hello")
    assert text(engine, "hello") != text(engine, "hello again")
    assert text(engine, "hello") != text(narrow_engine, "hello")  # another seed


async def test_text_completions_stream_and_whole(engine: EmulatorProcess) -> None:
    async with async_client(engine) as api:
        whole = await api.completions.create(model=MODEL, prompt=RAG_PROMPT, max_tokens=12)
        stream = await api.completions.create(
            model=MODEL, prompt=RAG_PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
        pieces, usage, finish_reason = [], None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                pieces.append(choice.text)
                finish_reason = choice.finish_reason or finish_reason

    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert "".join(pieces) == whole.choices[0].text
    assert whole.choices[0].text.startswith("Emulated answer, quoting the references: The tower")
    assert finish_reason == whole.choices[0].finish_reason == "length"
    assert usage.completion_tokens == whole.usage.completion_tokens == 12
    assert usage.prompt_tokens == count_tokens(RAG_PROMPT)


@pytest.mark.parametrize("sent_deltas", [1, 5, 13])
def test_stream_resumed_on_another_engine_equals_one_engine_answer(
    engine: EmulatorProcess, twin_engine: EmulatorProcess, sent_deltas: int
) -> None:
    messages = [{"role": "user", "content": RAG_PROMPT}]
    budget = 40
    one_engine, _, _ = stream_chat(engine, messages, max_tokens=budget, extra_body={"ignore_eos": True})

    # The first engine "dies" after some deltas; the gateway resends the
    # conversation with the partial answer to the twin and asks it to go on.
    partial = "".join(one_engine[:sent_deltas])
    resumed, finish_reason, usage = stream_chat(
        twin_engine,
        [*messages, {"role": "assistant", "content": partial}],
        max_tokens=budget - sent_deltas,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True},
    )

    assert partial + "".join(resumed) == "".join(one_engine)
    assert finish_reason == "length"
    assert usage.completion_tokens == budget - sent_deltas


def test_resume_from_inside_a_word_continues_from_that_character(
    engine: EmulatorProcess, twin_engine: EmulatorProcess
) -> None:
    with client(engine) as api:
        full = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10).choices[0].message.content
    partial = full[: full.index(" ", 10) - 2]  # cut two characters before a word ends
    with client(twin_engine) as api:
        rest = api.chat.completions.create(
            model=MODEL,
            messages=[*QUESTION, {"role": "assistant", "content": partial}],
            max_tokens=10 - count_tokens(partial) + 1,
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
    assert partial + rest.choices[0].message.content == full


# -- tokenize, models, health, version ------------------------------------------


def test_tokenize_counts_what_generation_counts_as_prompt(engine: EmulatorProcess) -> None:
    with client(engine) as api:
        reply = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    chat = httpx.post(engine.url + "/tokenize", json={"model": MODEL, "messages": QUESTION}).json()
    plain = httpx.post(
        engine.url + "/tokenize", json={"model": MODEL, "prompt": "one two  three\nfour", "return_token_strs": True}
    ).json()

    assert chat["count"] == reply.usage.prompt_tokens == len(chat["tokens"])
    assert chat["max_model_len"] == 256
    assert plain["count"] == 4
    assert plain["token_strs"] == ["one", "two", "three", "four"]
    assert all(isinstance(token, int) for token in plain["tokens"])


def test_models_health_and_version(engine: EmulatorProcess) -> None:
    with client(engine) as api:
        models = api.models.list().data
    assert [(m.id, m.owned_by, m.model_extra["max_model_len"]) for m in models] == [(MODEL, "vllm", 256)]
    assert httpx.get(engine.url + "/health").status_code == 200
    assert "version" in httpx.get(engine.url + "/version").json()
    assert f"engine-emulator: serving '{MODEL}' on {engine.url}" in engine.log()


# -- errors --------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


def test_unknown_model_is_404_not_found(engine: EmulatorProcess) -> None:
    with client(engine) as api, pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="no-such-model", messages=QUESTION)
    error = error_of(caught.value.response)
    assert error["type"] == "NotFoundError" and error["param"] == "model"
    assert error["message"] == "The model `no-such-model` does not exist."


def test_prompt_longer_than_the_context_is_400(engine: EmulatorProcess) -> None:
    long_question = [{"role": "user", "content": "word " * 300}]
    with client(engine) as api, pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=long_question, stream=True)
    error = error_of(caught.value.response)
    assert error["type"] == "BadRequestError" and error["param"] == "input_tokens"
    assert error["message"].startswith(
        "This model's maximum context length is 256 tokens. However, you requested 1 output tokens and your "
        "prompt contains at least 256 input tokens"
    )


def test_max_tokens_past_the_context_is_400(engine: EmulatorProcess) -> None:
    with client(engine) as api, pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=MODEL, prompt="a b c", max_tokens=300)
    error = error_of(caught.value.response)
    assert error["param"] == "max_tokens"
    assert error["message"] == (
        "max_tokens=300 cannot be greater than max_model_len=max_total_tokens=256. "
        "Please request fewer output tokens. (parameter=max_tokens, value=300)"
    )
    # Fits alone but not with the prompt: vLLM blames the input.
    with client(engine) as api, pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=MODEL, prompt="a b c", max_tokens=254)
    error = error_of(caught.value.response)
    assert error["param"] == "input_tokens"
    assert "you requested 254 output tokens and your prompt contains at least 3 input tokens" in error["message"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "'msg': 'JSON decode error'"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "emu-model"}', "'loc': ('body', 'messages'), 'msg': 'Field required'"),
        (b'{"messages": []}', "'msg': 'List should have at least 1 item after validation, not 0'"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "'msg': 'Input should be greater"),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}',
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}',
            "Stream options can only be defined when `stream=True`.",
        ),
    ],
)
def test_bad_bodies_are_400_in_the_error_envelope(engine: EmulatorProcess, body: bytes, expected: str) -> None:
    response = httpx.post(
        engine.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] in ("Bad Request", "BadRequestError")  # vLLM's words for validation and for the rest
    assert expected in error["message"]


def test_unknown_path_and_method_are_fastapis_plain_errors(engine: EmulatorProcess) -> None:
    assert httpx.get(engine.url + "/v1/nothing-here").json() == {"detail": "Not Found"}
    assert httpx.get(engine.url + "/v1/chat/completions").status_code == 405


# -- metrics and the capacity model --------------------------------------------


def test_metrics_have_vllm_names_and_move(engine: EmulatorProcess) -> None:
    labels = {"model_name": MODEL}
    before_generated = metric(engine, "vllm:generation_tokens_total", **labels)
    before_prompt = metric(engine, "vllm:prompt_tokens_total", **labels)
    before_length = metric(engine, "vllm:request_success_total", finished_reason="length", **labels)
    before_ttft = metric(engine, "vllm:time_to_first_token_seconds_count", **labels)
    before_lengths = metric(engine, "vllm:request_prompt_tokens_sum", **labels)
    with client(engine) as api:
        reply = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)

    assert metric(engine, "vllm:generation_tokens_total", **labels) == before_generated + 5
    assert metric(engine, "vllm:prompt_tokens_total", **labels) == before_prompt + reply.usage.prompt_tokens
    assert metric(engine, "vllm:request_success_total", finished_reason="length", **labels) == before_length + 1
    assert metric(engine, "vllm:time_to_first_token_seconds_count", **labels) == before_ttft + 1
    # The finished request's prompt length, in vLLM's 1-2-5 buckets up to max_model_len.
    assert metric(engine, "vllm:request_prompt_tokens_sum", **labels) == before_lengths + reply.usage.prompt_tokens
    bounds = {s.labels["le"] for s in scrape(engine.url + "/metrics").find("vllm:request_prompt_tokens_bucket")}
    assert {"1.0", "200.0", "+Inf"} <= bounds and "500.0" not in bounds  # max_model_len 256
    assert metric(engine, "vllm:num_requests_running", **labels) == 0
    assert metric(engine, "vllm:num_requests_waiting", **labels) == 0
    assert metric(engine, "vllm:kv_cache_usage_perc", **labels) == 0
    assert metric(engine, "vllm:cache_config_info", block_size="16", num_gpu_blocks="64") == 1


@pytest.mark.parametrize(
    ("max_model_len", "last"),
    [(1, 1.0), (2048, 2000.0), (8192, 5000.0), (10_000, 10_000.0), (32_768, 20_000.0)],
)
def test_prompt_length_buckets_are_vllms_1_2_5_up_to_the_context(max_model_len: int, last: float) -> None:
    buckets = one_two_five_buckets(max_model_len)
    assert buckets[:3] == (1.0, 2.0, 5.0)[: len(buckets)] and buckets[-1] == last


async def test_requests_beyond_max_num_seqs_wait_and_a_disconnect_frees_the_slot(
    narrow_engine: EmulatorProcess,
) -> None:
    labels = {"model_name": MODEL}
    aborted_before = metric(narrow_engine, "vllm:request_success_total", finished_reason="abort", **labels)
    async with async_client(narrow_engine) as api:
        # Endless answers (ignore_eos, a huge budget) that only a disconnect ends.
        holders = [
            await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=8000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for i in range(4)
        ]
        await asyncio.to_thread(
            eventually,
            lambda: (
                (
                    metric(narrow_engine, "vllm:num_requests_running", **labels),
                    metric(narrow_engine, "vllm:num_requests_waiting", **labels),
                )
                == (2, 2)
            ),
            what="2 running and 2 waiting",
        )
        assert metric(narrow_engine, "vllm:kv_cache_usage_perc", **labels) > 0

        # A short request queues behind them; closing a running stream makes room.
        short = asyncio.ensure_future(api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3))
        await asyncio.to_thread(
            eventually,
            lambda: metric(narrow_engine, "vllm:num_requests_waiting", **labels) == 3,
            what="the short request queued",
        )
        for holder in holders:
            await holder.close()
        reply = await short

    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    await asyncio.to_thread(
        eventually,
        lambda: (
            (
                metric(narrow_engine, "vllm:num_requests_running", **labels),
                metric(narrow_engine, "vllm:num_requests_waiting", **labels),
            )
            == (0, 0)
        ),
        what="engine idle",
    )
    assert metric(narrow_engine, "vllm:request_success_total", finished_reason="abort", **labels) == aborted_before + 4


def test_a_client_giving_up_on_a_whole_answer_aborts_it(narrow_engine: EmulatorProcess) -> None:
    labels = {"model_name": MODEL}
    aborted_before = metric(narrow_engine, "vllm:request_success_total", finished_reason="abort", **labels)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            narrow_engine.url + "/v1/chat/completions",
            timeout=httpx.Timeout(10, read=0.3),
            json={"messages": QUESTION, "max_tokens": 8000, "ignore_eos": True},
        )
    eventually(
        lambda: (
            metric(narrow_engine, "vllm:request_success_total", finished_reason="abort", **labels) == aborted_before + 1
        ),
        what="the abandoned request aborted",
    )
    assert metric(narrow_engine, "vllm:num_requests_running", **labels) == 0


def test_full_kv_cache_preempts_and_recomputes_without_changing_the_text() -> None:
    # 20 blocks of 16 tokens hold 320 tokens: two 200-token answers cannot
    # both fit, so the later one is preempted and finishes after the first.
    with started(seed=3, ttft_ms=1, itl_ms=1, block_size=16, num_gpu_blocks=20, max_model_len=320) as small:

        async def both() -> list:
            async with async_client(small) as api:
                return await asyncio.gather(
                    *(
                        api.chat.completions.create(
                            model=MODEL,
                            messages=[{"role": "user", "content": q}],
                            max_tokens=200,
                            extra_body={"ignore_eos": True},
                        )
                        for q in ("first question", "second question")
                    )
                )

        replies = asyncio.run(both())
        preemptions = metric(small, "vllm:num_preemptions_total", model_name=MODEL)
        with client(small) as api:
            alone = api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "second question"}],
                max_tokens=200,
                extra_body={"ignore_eos": True},
            )

    assert preemptions >= 1
    assert [r.usage.completion_tokens for r in replies] == [200, 200]
    assert replies[1].choices[0].message.content == alone.choices[0].message.content


# -- lifecycle -----------------------------------------------------------------


def test_connections_are_refused_until_the_emulated_load_ends() -> None:
    with start_engine_emulator(served_model_name=MODEL, startup_delay=1.5) as loading:
        # vLLM has no 503 phase: until it is ready nothing listens.
        assert loading.health_status() is None
        with pytest.raises(httpx.ConnectError):
            httpx.post(loading.url + "/v1/chat/completions", json={"messages": QUESTION})
        loading.wait_ready()
        assert loading.health_status() == 200


@contextlib.contextmanager
def open_stream(process: EmulatorProcess, max_tokens: int, read_timeout: float = 30.0) -> Iterator[Iterator[str]]:
    """A raw streamed chat (its SSE lines), started and past its role chunk."""
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    timeout = httpx.Timeout(30.0, read=read_timeout)
    with httpx.stream("POST", process.url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        lines = (line for line in response.iter_lines() if line)
        assert '"role":"assistant"' in next(lines)
        yield lines


def test_sigterm_with_shutdown_timeout_finishes_the_running_stream_then_exits() -> None:
    process = started(seed=5, ttft_ms=1, itl_ms=20, shutdown_timeout=30)
    try:
        with open_stream(process, 60) as lines:
            process.terminate()
            # Refused from ~0.1 s after SIGTERM; never a 503.
            eventually(lambda: process.health_status() is None, what="health refused")
            with pytest.raises(httpx.ConnectError):
                httpx.post(process.url + "/v1/chat/completions", json={"messages": QUESTION})
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-3]
        assert '"completion_tokens":60' in rest[-2]
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_sigterm_without_shutdown_timeout_aborts_running_streams_cleanly() -> None:
    process = started(seed=5, ttft_ms=1, itl_ms=20)
    try:
        with open_stream(process, 5000) as lines:
            next(lines)
            process.terminate()
            rest = list(lines)
        # As vLLM with --shutdown-timeout 0: a last chunk that says "abort", the usage, [DONE].
        assert rest[-1] == "data: [DONE]"
        assert '"choices":[]' in rest[-2] and '"usage"' in rest[-2]
        assert '"finish_reason":"abort"' in rest[-3]
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_a_shutdown_timeout_that_runs_out_stalls_the_stream_until_the_client_drops_it() -> None:
    process = started(seed=5, ttft_ms=1, itl_ms=20, shutdown_timeout=0.3)
    try:
        with open_stream(process, 5000, read_timeout=1.0) as lines:
            next(lines)
            process.terminate()
            eventually(lambda: process.health_status() is None, what="health refused")
            eventually(lambda: "shutdown timeout over" in process.log(), what="the drain to run out")
            # As vLLM 0.26: the bytes stop, with no finish_reason and no [DONE], and
            # the connection stays open (a read times out rather than ending).
            seen = []
            with pytest.raises(httpx.ReadTimeout):
                seen.extend(lines)
            assert seen and not any('finish_reason":"' in line or "[DONE]" in line for line in seen)
            assert process.returncode is None  # waiting for the connection to close
        # The client dropped it: now the process exits.
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_sigkill_mid_stream_breaks_the_stream() -> None:
    process = started(seed=5, ttft_ms=1, itl_ms=20)
    with client(process) as api:
        stream = api.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5000, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        process.kill()
        with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
            for _ in chunks:
                pass
    assert process.wait(timeout=10) == -9


# -- command line and helper ---------------------------------------------------


def test_command_line_help_and_bad_settings() -> None:
    run = [sys.executable, "-m", "spotrag_runtime.engine_emulator"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--shutdown-timeout" in shown.stdout and "--max-num-seqs" in shown.stdout

    refused = subprocess.run([*run, "--max-model-len", "200000"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert "less than max_model_len 200000" in refused.stderr


def test_helper_refuses_unknown_options_before_starting_anything() -> None:
    with pytest.raises(TypeError, match="max_num_seq"):
        start_engine_emulator(max_num_seq=4)
    with pytest.raises(ValueError, match="itl_ms must not be negative"):
        start_engine_emulator(itl_ms=-1)


def test_sleep_mode_sleeps_wakes_and_is_off_unless_enabled() -> None:
    with started(**FAST_ENGINE, enable_sleep_mode=True, sleep_seconds=0, resleep_seconds=0, wake_seconds=0) as sleepy:
        assert httpx.get(sleepy.url + "/is_sleeping").json() == {"is_sleeping": False}
        assert httpx.post(sleepy.url + "/sleep", params={"level": 1}).status_code == 200
        assert httpx.get(sleepy.url + "/is_sleeping").json() == {"is_sleeping": True}
        assert sleepy.health_status() == 200  # asleep is alive: the pod stays Ready
        asleep = httpx.post(sleepy.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3})
        assert asleep.status_code == 503
        assert httpx.post(sleepy.url + "/wake_up").status_code == 200
        assert httpx.get(sleepy.url + "/is_sleeping").json() == {"is_sleeping": False}
        awake = httpx.post(sleepy.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3})
        assert awake.status_code == 200 and awake.json()["choices"][0]["message"]["content"]
    with started(**FAST_ENGINE) as plain:
        # As the real server without --enable-sleep-mode: /is_sleeping is 404.
        assert httpx.get(plain.url + "/is_sleeping").status_code == 404
        assert httpx.post(plain.url + "/sleep").status_code == 404


def test_a_standby_that_cannot_wake_answers_500() -> None:
    with started(**FAST_ENGINE, enable_sleep_mode=True, sleep_seconds=0, wake_fails=True) as broken:
        httpx.post(broken.url + "/sleep", params={"level": 1}).raise_for_status()
        failed = httpx.post(broken.url + "/wake_up")
        assert failed.status_code == 500 and "wake_up failed" in failed.json()["error"]["message"]
        assert httpx.get(broken.url + "/is_sleeping").json() == {"is_sleeping": True}


def test_a_hardware_preset_sets_the_capacity_model_and_explicit_flags_still_win() -> None:
    from spotrag_runtime.engine_emulator.config import HARDWARE_PRESETS, config_from_args, parse_arguments

    preset = HARDWARE_PRESETS["h200-llama-3.1-8b"]
    _, args = parse_arguments(["--hardware", "h200-llama-3.1-8b"])
    config = config_from_args(args)
    assert {name: getattr(config, name) for name in preset} == preset
    assert config.kv_capacity_tokens == 896_912  # the measured KV cache

    _, args = parse_arguments(["--hardware", "h200-llama-3.1-8b", "--itl-ms", "7"])
    assert config_from_args(args).itl_ms == 7
    assert config_from_args(args).prefill_tokens_per_s == preset["prefill_tokens_per_s"]


def test_a_completion_prompt_of_token_ids_counts_one_token_per_id(engine: EmulatorProcess) -> None:
    body = {"model": MODEL, "prompt": [1000, 2000, 3000, 4000], "max_tokens": 3, "ignore_eos": True}
    response = httpx.post(engine.url + "/v1/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 3, 7)
