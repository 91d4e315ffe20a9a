"""The engine emulator held against transcripts of the real vLLM 0.26.0 server
(tests/data/vllm-0.26.0/, see its README): the same requests replayed against
the emulator must get the same status codes, content types, body shapes, error
envelopes, chunk shapes, metric names and SIGTERM behaviour. Text and token ids
differ (a random tiny model there, deterministic text here) and are not compared.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotrag_runtime.engine_emulator import EmulatorProcess, start_engine_emulator

DATA = Path(__file__).parent.parent / "data" / "vllm-0.26.0"
REAL = DATA / "runA"
MODEL = "tiny"  # as served in the transcripts
MAX_MODEL_LEN = 2048
# What the project reads from engines' /metrics (operator and gateway).
METRICS_READ = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens",
)


@dataclass
class Exchange:
    method: str
    path: str
    request: bytes | None
    status: int | None
    headers: dict[str, str]
    body: bytes


def exchange(name: str) -> Exchange:
    """A ``record()`` transcript of probe.py: request line, body, status, headers, body."""
    raw = (REAL / name).read_bytes()
    head, _, body = raw.partition(b"\n\n")
    lines = head.decode().split("\n")
    method, path = lines[0].split(" ", 1)
    request = lines[1].removeprefix("request: ").encode() or None
    status = re.match(r"--- status (\S+)", lines[2]).group(1)
    headers = dict(line.split(": ", 1) for line in lines[3:] if ": " in line)
    return Exchange(method, path, request, None if status == "None" else int(status), headers, body)


def stream_transcript(name: str) -> tuple[str, list[Any]]:
    """A ``raw_stream()`` transcript: the status line and the SSE data (JSON, or "[DONE]")."""
    text = (REAL / name).read_text()
    head, _, body = text.partition("\n---- de-chunked body ----\n")
    return head.split("\n", 1)[0], sse_data(body)


def sse_data(body: str) -> list[Any]:
    out = []
    for line in body.split("\n"):
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def shape(value: Any) -> Any:
    """Keys and value kinds, not values: what a client's parser depends on."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


@pytest.fixture(scope="module")
def engine() -> Iterator[EmulatorProcess]:
    with start_engine_emulator(
        served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, seed=3, ttft_ms=1, itl_ms=1
    ) as process:
        process.wait_ready()
        yield process


def replay(engine: EmulatorProcess, recorded: Exchange) -> httpx.Response:
    headers = {"Content-Type": "application/json"} if recorded.request else {}
    return httpx.request(
        recorded.method, engine.url + recorded.path, content=recorded.request, headers=headers, timeout=30
    )


@pytest.mark.parametrize(
    "name",
    [
        "get_health.txt",
        "get_ping.txt",
        "get_models.txt",
        "get_version.txt",
        "get_load.txt",
        "get_server_info.txt",
        "post_tokenize_prompt.txt",
        "post_tokenize_messages.txt",
        "post_tokenize_nomodel.txt",
        "post_chat_nonstream.txt",
        "post_completions_nonstream.txt",
    ],
)
def test_endpoints_answer_as_the_real_server(engine: EmulatorProcess, name: str) -> None:
    recorded = exchange(name)
    response = replay(engine, recorded)
    assert response.status_code == recorded.status
    assert response.headers.get("content-type") == recorded.headers.get("content-type")
    if recorded.body:
        assert shape(response.json()) == shape(json.loads(recorded.body))
    else:
        assert response.content == b""


def test_tokenize_counts_and_limits_like_the_real_server(engine: EmulatorProcess) -> None:
    body = replay(engine, exchange("post_tokenize_prompt.txt")).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] is None


@pytest.mark.parametrize(
    ("name", "same_message"),
    [
        ("err_unknown_model.txt", True),
        ("err_max_tokens_too_big.txt", True),
        # The emulator counts this prompt as more than 2041 tokens too; vLLM stops counting there.
        ("err_prompt_too_long.txt", True),
        ("err_bad_json.txt", True),
        ("err_missing_messages.txt", False),  # the echoed input differs in key order
    ],
)
def test_errors_have_the_real_status_envelope_and_words(engine: EmulatorProcess, name: str, same_message: bool) -> None:
    recorded = exchange(name)
    response = replay(engine, recorded)
    real = json.loads(recorded.body)["error"]
    error = response.json()["error"]
    assert response.status_code == recorded.status
    assert (error["type"], error["param"], error["code"]) == (real["type"], real["param"], real["code"])
    if same_message:
        assert error["message"] == real["message"]


def test_a_too_long_streamed_prompt_is_a_plain_json_400(engine: EmulatorProcess) -> None:
    text = (REAL / "err_stream_prompt_too_long.sse.txt").read_text()
    head, _, body = text.partition("\n---- de-chunked body ----\n")
    request = json.loads((REAL / "err_prompt_too_long.txt").read_text().split("\n")[1].removeprefix("request: ")) | {
        "stream": True
    }
    response = httpx.post(engine.url + "/v1/chat/completions", json=request, timeout=30)
    assert head.startswith("HTTP/1.1 400") and "content-type: application/json" in head
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(body)


def emulator_stream(engine: EmulatorProcess, request: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    with httpx.stream("POST", engine.url + request.pop("_path"), json=request, timeout=30) as response:
        body = response.read().decode()
    return response, sse_data(body)


def probe_request(name: str) -> dict[str, Any]:
    """The request of a stream transcript (probe.py's chat_body / completions body)."""
    timeline = {
        "chat_stream_usage.sse.txt": {
            "_path": "/v1/chat/completions",
            "max_tokens": 24,
            "stream_options": {"include_usage": True},
        },
        "chat_stream_nousage.sse.txt": {"_path": "/v1/chat/completions", "max_tokens": 8},
        "chat_stream_continuous_usage.sse.txt": {
            "_path": "/v1/chat/completions",
            "max_tokens": 8,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "completions_stream_usage.sse.txt": {
            "_path": "/v1/completions",
            "max_tokens": 8,
            "stream_options": {"include_usage": True},
        },
    }[name]
    body: dict[str, Any] = {"model": MODEL, "stream": True, "temperature": 0, "ignore_eos": True, **timeline}
    if body["_path"] == "/v1/completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "What is a lighthouse?"}]
    return body


def chunk_kinds(events: list[Any]) -> list[tuple[str, Any]]:
    """Each event as (kind, shape): role, content, finish, usage, done; runs of
    content chunks folded into one, since their number depends on the text."""
    kinds: list[tuple[str, Any]] = []
    for event in events:
        if event == "[DONE]":
            kind = ("done", None)
        elif not event["choices"]:
            kind = ("usage", shape(event))
        else:
            choice = event["choices"][0]
            if choice.get("finish_reason"):
                kind = ("finish", shape({k: v for k, v in event.items() if k != "system_fingerprint"}))
            elif (choice.get("delta") or {}).get("role"):
                kind = ("role", shape(event))
            else:
                kind = ("content", shape(event))
        if not (kinds and kind[0] == "content" and kinds[-1] == kind):
            kinds.append(kind)
    return kinds


@pytest.mark.parametrize(
    "name",
    [
        "chat_stream_usage.sse.txt",
        "chat_stream_nousage.sse.txt",
        "chat_stream_continuous_usage.sse.txt",
        "completions_stream_usage.sse.txt",
    ],
)
def test_streams_have_the_real_chunk_sequence_and_shapes(engine: EmulatorProcess, name: str) -> None:
    status_line, real = stream_transcript(name)
    response, emulated = emulator_stream(engine, probe_request(name))
    assert status_line == "HTTP/1.1 200 OK" and response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert chunk_kinds(emulated) == chunk_kinds(real)


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """vLLM metric families: name -> (type, label names)."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("vllm:") and not family.name.endswith("_created"):
            labels = {label for sample in family.samples for label in sample.labels}
            out[family.name] = (family.type, labels - {"le"})
    return out


def test_metrics_are_named_typed_and_labelled_as_the_real_ones(engine: EmulatorProcess) -> None:
    real_text = (REAL / "metrics_during_load.txt").read_text().partition("\n\n")[2]
    real, emulated = families(real_text), families(httpx.get(engine.url + "/metrics").text)
    for name, (kind, labels) in emulated.items():
        assert name in real, f"{name} is not a vLLM 0.26.0 metric"
        assert kind == real[name][0], name
        assert labels <= real[name][1], name
    for name in METRICS_READ:
        assert name in emulated and real[name][1] >= {"engine", "model_name"}
    assert "vllm:gpu_cache_usage_perc" not in real and "vllm:gpu_cache_usage_perc" not in emulated
    # A 0-1 fraction in both.
    for text in (real_text, httpx.get(engine.url + "/metrics").text):
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "vllm:kv_cache_usage_perc"
        ]
        assert values and all(0 <= value <= 1 for value in values)


# -- SIGTERM -------------------------------------------------------------------


def sigterm_facts(run: str) -> dict[str, Any]:
    summary = json.loads((DATA / run / "summary.json").read_text())
    cmd = summary["cmd"]
    sigterm = summary["sigterm"]
    return {
        "shutdown_timeout": float(cmd[cmd.index("--shutdown-timeout") + 1]),
        "stream": sigterm["stream"],
        "health_after": sigterm["health_transitions"][-1][1],
        "new_request": sigterm["new_request_during_drain"]["status"],
        "rc": sigterm["rc"],
    }


@pytest.mark.parametrize(
    ("run", "shutdown_timeout", "max_tokens"),
    [
        # Scaled to the emulator's clock: the stream fits in the timeout, or it does not.
        ("runA", 30.0, 150),
        ("runC", 0.0, 2000),
        ("runE", 0.5, 2000),
    ],
)
def test_sigterm_under_a_stream_does_what_the_real_server_did(
    run: str, shutdown_timeout: float, max_tokens: int
) -> None:
    facts = sigterm_facts(run)
    assert (facts["shutdown_timeout"] == 0) == (shutdown_timeout == 0)
    real = facts["stream"]
    process = start_engine_emulator(
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        seed=3,
        ttft_ms=1,
        itl_ms=10,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        process.wait_ready()
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        events: list[Any] = []
        timeout = httpx.Timeout(30.0, read=2.0)
        with httpx.stream("POST", process.url + "/v1/chat/completions", json=body, timeout=timeout) as response:
            lines = response.iter_lines()
            events.extend(sse_data(next(lines)))
            process.terminate()
            stalled = False
            try:
                for line in lines:
                    events.extend(sse_data(line))
                    if line == "data: [DONE]":
                        break
            except httpx.ReadTimeout:
                stalled = True  # the bytes stopped and the connection stayed open
                health_while_open = process.health_status()
                new_request = None
                try:
                    new_request = httpx.post(process.url + "/v1/models").status_code
                except httpx.ConnectError:
                    pass
                alive_while_open = process.returncode is None
        code = process.wait(timeout=10)
    finally:
        process.kill()
        process.wait()

    finish = [c["choices"][0]["finish_reason"] for c in events if c != "[DONE]" and c["choices"]][-1]
    usage = [c["usage"] for c in events if c != "[DONE]" and c.get("usage")]
    assert ("[DONE]" in events) == real["done"]
    assert finish == real["finish_reason"]
    assert bool(usage) == bool(real["usage"])
    assert stalled == (not real["done"])
    if stalled:
        # vLLM: refused from ~0.1 s after SIGTERM; no exit while the stream is open.
        assert health_while_open == facts["health_after"] is None
        assert new_request == facts["new_request"] is None
        assert alive_while_open
    assert code == 0  # runE: exit 0 once the client dropped the stream; runA, runC: on their own
    assert facts["rc"] == 0
    if run == "runC":
        # The aborted stream's last chunks have the real shapes too.
        body = (
            (DATA / run / "sigterm_inflight_stream.sse.txt").read_text().partition("\n---- de-chunked body ----\n")[2]
        )
        assert chunk_kinds(events)[-3:] == chunk_kinds(sse_data(body))[-3:]
