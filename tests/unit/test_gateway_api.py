"""The gateway's API as a client sees it: the official openai client (and raw
HTTP for what a client library would not send) against a real gateway, two
engine emulator processes, the shipped MiniLM model and a faiss index of the
bundled corpus."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from .gateway_fixtures import (
    SERVED_MODEL,
    RunningGateway,
    direct_answer,
    gateway_config,
    running_engines,
    sample_questions,
    tokenize_count,
)

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def engines() -> Iterator[list]:
    with running_engines(2) as engines:
        yield engines


@pytest.fixture(scope="module")
def gateway(engines) -> Iterator[RunningGateway]:
    config = gateway_config(
        [engine.url for engine in engines],
        admission={"maxTokensLimit": 1024, "defaultMaxTokens": 64, "maxBodyBytes": MAX_BODY_BYTES},
    )
    with RunningGateway(config) as running:
        yield running


@pytest.fixture
def client(gateway: RunningGateway) -> Iterator[openai.OpenAI]:
    with gateway.client() as client:
        yield client


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_lists_only_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [SERVED_MODEL]
    assert client.models.retrieve(SERVED_MODEL).id == SERVED_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_every_sample_question_retrieves_the_passage_that_holds_its_answer(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for sample in sample_questions():
            response = http.post("/v1/rag/query", json={"question": sample.question, "generate": False})
            assert response.status_code == 200, response.text
            passages = response.json()["passages"]
            assert [p["number"] for p in passages] == list(range(1, len(passages) + 1))
            holding = [p for p in passages if p["source"] == sample.source]
            assert holding, f"{sample.question!r}: {sample.source} not among {[p['source'] for p in passages]}"


def test_the_answer_cites_the_top_passage_and_rag_query_returns_it(
    gateway: RunningGateway, client: openai.OpenAI
) -> None:
    sample = next(s for s in sample_questions() if s.source == "handbook/pets-onboard.md")
    result = httpx.post(f"{gateway.url}/v1/rag/query", json={"question": sample.question, "max_tokens": 40}, timeout=30)
    assert result.status_code == 200, result.text
    body = result.json()
    top = body["passages"][0]
    assert top["source"] == sample.source and sample.answer in top["text"]
    assert body["usage"]["completion_tokens"] == 40 and body["finish_reason"] == "length"
    # The emulator quotes the reference sentence that best matches the question,
    # with its marker: seeing the answer there shows the engine got this passage as [1].
    first_quote, marker = body["answer"].split(" [", 1)
    assert first_quote.startswith("Emulated answer, quoting the references: ") and sample.answer in first_quote
    assert marker.startswith("1].") and first_quote.split(": ", 1)[1] in top["text"]
    # The chat API grounds the same question the same way.
    completion = client.chat.completions.create(model=SERVED_MODEL, messages=ask(sample.question), max_tokens=40)
    assert completion.choices[0].message.content == body["answer"]
    assert completion.usage.prompt_tokens == body["usage"]["prompt_tokens"]


def test_streamed_and_whole_answers_are_the_same(client: openai.OpenAI) -> None:
    question = ask("When does vehicle check-in close?")
    whole = client.chat.completions.create(model=SERVED_MODEL, messages=question, max_tokens=30)
    stream = client.chat.completions.create(
        model=SERVED_MODEL, messages=question, max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert {chunk.model for chunk in chunks} == {SERVED_MODEL}
    roles = [chunk.choices[0].delta.role for chunk in chunks if chunk.choices and chunk.choices[0].delta.role]
    assert roles == ["assistant"]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 30


def test_without_rag_the_engine_gets_the_conversation_as_sent(engines: list, client: openai.OpenAI) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about ferries."},
    ]
    expected_text = direct_answer(engines[0], conversation, max_tokens=25)
    expected_prompt = tokenize_count(engines[0], conversation)
    by_body = client.chat.completions.create(
        model=SERVED_MODEL, messages=conversation, max_tokens=25, extra_body={"rag": False}
    )
    by_header = client.chat.completions.create(
        model=SERVED_MODEL, messages=conversation, max_tokens=25, extra_headers={"X-Spotrag-Rag": "off"}
    )
    for completion in (by_body, by_header):
        assert completion.choices[0].message.content == expected_text
        assert completion.usage.prompt_tokens == expected_prompt
    grounded = client.chat.completions.create(model=SERVED_MODEL, messages=conversation, max_tokens=25)
    assert grounded.usage.prompt_tokens > expected_prompt  # system prompt, references and template


def test_a_prompt_that_cannot_fit_the_context_is_400_context_length_exceeded(client: openai.OpenAI) -> None:
    too_long = " ".join(["word"] * 8200)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=SERVED_MODEL, messages=ask(too_long), max_tokens=10, extra_body={"rag": False}
        )
    error = raised.value.body
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "maximum context length is 8192 tokens" in error["message"]


def test_long_retrieved_context_is_trimmed_rather_than_refused(engines: list, gateway: RunningGateway) -> None:
    # 7,900 words of question leave room for the question but not for every passage.
    question = "Where is the defibrillator kept on the ship? " + " ".join(["please"] * 7900)
    response = httpx.post(f"{gateway.url}/v1/rag/query", json={"question": question, "max_tokens": 10}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["passages"]) < 4
    assert body["usage"]["prompt_tokens"] + 10 <= 8192


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("content", "status", "expected"),
    [
        (b"{not json", 400, {"type": "invalid_request_error", "message": "The request body is not valid JSON"}),
        (b'{"model": "hfl-assistant"}', 400, {"param": "messages", "message": "messages: Field required"}),
        (b'{"model": "hfl-assistant", "messages": []}', 400, {"param": "messages"}),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, {"param": "model"}),
        (
            b'{"model": "hfl-assistant", "messages": [{"role": "wizard", "content": "hi"}]}',
            400,
            {"param": "messages.0.role"},
        ),
        (
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}',
            404,
            {"code": "model_not_found", "param": "model"},
        ),
        (
            b'{"model": "hfl-assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}',
            400,
            {"param": "max_tokens", "message": "max_tokens is 5000, above this endpoint's limit of 1024."},
        ),
        (
            b'{"model": "hfl-assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
            400,
            {"param": "max_tokens"},
        ),
        (
            b'{"model": "hfl-assistant", "messages": [{"role": "user", "content": "hi"}], "n": 2}',
            400,
            {"param": "n", "message": "n: Value error, only n=1 is supported"},
        ),
        (
            b'{"model": "hfl-assistant", "messages": [{"role": "system", "content": "hi"}]}',
            400,
            {"param": "messages", "message": "Retrieval needs a user message with the question."},
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors(
    gateway: RunningGateway, content: bytes, status: int, expected: dict
) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    error = error_of(response)
    for key, value in expected.items():
        assert error[key] == value if key != "message" else error[key].startswith(value), error


def test_bad_rag_queries_get_openai_errors(gateway: RunningGateway) -> None:
    blank = httpx.post(f"{gateway.url}/v1/rag/query", json={"question": "   "})
    assert blank.status_code == 400 and error_of(blank)["param"] == "question"
    wrong_model = httpx.post(f"{gateway.url}/v1/rag/query", json={"question": "hi", "model": "other"})
    assert wrong_model.status_code == 404 and error_of(wrong_model)["code"] == "model_not_found"
    bad_option = httpx.post(f"{gateway.url}/v1/rag/query", json={"question": "hi", "n": 3})
    assert bad_option.status_code == 400 and error_of(bad_option)["param"] == "n"


def test_oversized_bodies_are_refused_before_they_are_parsed(gateway: RunningGateway) -> None:
    # Not even JSON: were it parsed, the answer would be "not valid JSON".
    oversized = b"x" * (MAX_BODY_BYTES + 1)
    declared = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=oversized, headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert error_of(declared)["code"] == "request_too_large"
    assert f"limit of {MAX_BODY_BYTES} bytes" in error_of(declared)["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096

    streamed = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "request_too_large"


def test_unknown_paths_and_methods_answer_in_the_same_shape(gateway: RunningGateway) -> None:
    missing = httpx.get(f"{gateway.url}/v1/embeddings")
    assert missing.status_code == 404 and error_of(missing)["type"] == "invalid_request_error"
    wrong_method = httpx.get(f"{gateway.url}/v1/chat/completions")
    assert wrong_method.status_code == 405 and error_of(wrong_method)["message"] == "Method Not Allowed"


def test_health_readiness_and_metrics(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gateway.url}/readyz").json() == {"status": "ready", "engines": 2}
    page = httpx.get(f"{gateway.url}/metrics").text
    for name in (
        "spotrag_queued_tokens",
        "spotrag_engine_inflight_tokens",
        "spotrag_requests_total",
        "spotrag_retries_total",
        "spotrag_resumed_streams_total",
        "spotrag_time_to_first_token_seconds",
        "spotrag_inter_token_latency_seconds",
        "spotrag_request_duration_seconds",
        "spotrag_retrieval_seconds",
        "spotrag_index_passages",
        "spotrag_index_info",
        "spotrag_engines",
    ):
        assert f"# TYPE {name} " in page, name
    index = gateway.gateway.retrieval.index
    assert gateway.metric("spotrag_index_passages") == index.size
    assert gateway.metric("spotrag_index_info", version=index.version, model=index.manifest.model) == 1
    assert gateway.metric("spotrag_engines", state="serving") == 2
    assert gateway.metric("spotrag_requests_total", outcome="success") > 0
    assert gateway.metric("spotrag_requests_total", outcome="invalid") > 0
    assert gateway.metric("spotrag_retrieval_seconds_count", stage="embed") > 0
    assert gateway.metric("spotrag_queued_tokens") == 0  # nothing in flight between tests


def test_json_error_bodies_are_valid_for_the_openai_client_too(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=SERVED_MODEL, messages=[], max_tokens=5)
    assert raised.value.status_code == 400
    assert json.loads(raised.value.response.text)["error"]["param"] == "messages"
