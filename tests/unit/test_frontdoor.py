"""The front door in front of real gateways (each a uvicorn server with its
own engine emulator process), over HTTP: routing by model, splits, sticky
users, errors in OpenAI's shape, API keys with model allow-lists, moderation
of questions and of streamed answers, metrics per model and variant."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from spotrag_box.testing import Metrics, eventually
from spotrag_runtime.frontdoor.config import FrontDoorConfig, StaticBackend

from .frontdoor_fixtures import RunningFrontDoor, moderation_checker
from .gateway_fixtures import RunningGateway, gateway_config, running_engines

QUESTION = [{"role": "user", "content": "When does the first ferry leave on Sundays?"}]


@dataclass
class Gateways:
    v1: RunningGateway
    v2: RunningGateway

    def backends(self, w1: int = 1, w2: int = 1, **extra) -> tuple[StaticBackend, ...]:
        return (
            StaticBackend("chat", "chat-v1", self.v1.url, w1, served_model_name="chat-v1"),
            StaticBackend("chat", "chat-v2", self.v2.url, w2, served_model_name="chat-v2"),
            *extra.values(),
        )


@contextlib.contextmanager
def _gateway(name: str) -> Iterator[RunningGateway]:
    with running_engines(1, served_model_name=name) as [engine]:
        config = gateway_config([engine.url], retrieval={"enabled": False}, servedModelName=name)
        with RunningGateway(config) as gateway:
            yield gateway


@pytest.fixture(scope="module")
def gateways() -> Iterator[Gateways]:
    with _gateway("chat-v1") as v1, _gateway("chat-v2") as v2:
        yield Gateways(v1, v2)


@pytest.fixture(scope="module")
def door(gateways) -> Iterator[RunningFrontDoor]:
    with RunningFrontDoor(FrontDoorConfig(static=gateways.backends())) as running:
        yield running


def ask(url: str, model: str | None = "chat", *, stream: bool = False, headers=None, **body) -> httpx.Response:
    payload = {"messages": QUESTION, "max_tokens": 8, "stream": stream, **body}
    if model is not None:
        payload["model"] = model
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers or {}, timeout=30)


def sse_events(response: httpx.Response) -> list[dict | str]:
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_lists_every_model_and_each_split(door) -> None:
    listing = httpx.get(f"{door.url}/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["chat", "chat-v1", "chat-v2"]
    chat = listing["data"][0]["spotrag"]
    assert [(v["ragDeployment"], v["share"], v["reachable"]) for v in chat["variants"]] == [
        ("static/chat-v1", 0.5, True),
        ("static/chat-v2", 0.5, True),
    ]
    assert httpx.get(f"{door.url}/v1/models/chat-v2").json()["id"] == "chat-v2"
    assert httpx.get(f"{door.url}/readyz").json()["models"] == ["chat", "chat-v1", "chat-v2"]


def test_each_model_goes_to_its_gateway_streamed_or_not(door, gateways) -> None:
    for model in ("chat-v1", "chat-v2"):
        whole = ask(door.url, model)
        assert whole.status_code == 200, whole.text
        assert whole.json()["model"] == model
        assert whole.headers["x-spotrag-variant"] == f"static/{model}"
        streamed = ask(door.url, model, stream=True)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == whole.json()["choices"][0]["message"]["content"]


def test_a_split_sends_both_variants_traffic_and_rewrites_the_model(door) -> None:
    seen = Counter()
    for _ in range(40):
        response = ask(door.url, "chat")
        assert response.status_code == 200
        seen[response.json()["model"]] += 1
    assert set(seen) == {"chat-v1", "chat-v2"}


def test_a_sticky_user_stays_on_one_variant(door) -> None:
    variants = {ask(door.url, headers={"X-Spotrag-User": "alice"}).headers["x-spotrag-variant"] for _ in range(10)}
    assert len(variants) == 1


def test_unknown_model_is_model_not_found_listing_what_exists(door) -> None:
    response = ask(door.url, "gpt-4o")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model 'gpt-4o' does not exist. Models served here: chat, chat-v1, chat-v2.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert httpx.get(f"{door.url}/v1/models/gpt-4o").status_code == 404


def test_no_model_with_several_served_is_a_clear_400_and_with_one_is_fine(door, gateways) -> None:
    response = ask(door.url, None)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert "'model' is required: this endpoint serves 3 models: chat, chat-v1, chat-v2." in response.text
    single = (StaticBackend("chat-v1", "only", gateways.v1.url),)
    with RunningFrontDoor(FrontDoorConfig(static=single)) as alone:
        assert ask(alone.url, None).json()["model"] == "chat-v1"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [(b"{not json", 400, None), (b"[1, 2]", 400, None), (b"x" * 5000, 413, "request_too_large")],
)
def test_bad_bodies_get_openai_errors(door, gateways, content, status, code) -> None:
    config = FrontDoorConfig(static=gateways.backends(), max_body_bytes=4096)
    with RunningFrontDoor(config) as small:
        response = httpx.post(f"{small.url}/v1/chat/completions", content=content)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_weights_of_zero_take_a_variant_out_and_all_zero_is_503(gateways) -> None:
    with RunningFrontDoor(FrontDoorConfig(static=gateways.backends(0, 1))) as running:
        assert {ask(running.url).json()["model"] for _ in range(10)} == {"chat-v2"}
        running.frontdoor.discovery.set_backends(gateways.backends(0, 0))
        response = ask(running.url)
        assert (response.status_code, response.json()["error"]["code"]) == (503, "no_backend")


def test_a_weight_change_under_load_moves_traffic_and_fails_no_request(gateways) -> None:
    with RunningFrontDoor(FrontDoorConfig(static=gateways.backends(1, 0))) as running:

        def one(i: int) -> tuple[int, str]:
            response = ask(running.url, stream=i % 2 == 0, max_tokens=16)
            return response.status_code, response.headers.get("x-spotrag-variant", "")

        with ThreadPoolExecutor(8) as pool:
            before = list(pool.map(one, range(24)))
            during = [pool.submit(one, i) for i in range(24)]
            running.frontdoor.discovery.set_backends(gateways.backends(0, 1))
            after = list(pool.map(one, range(24)))
        results = before + [f.result() for f in during] + after
        assert {status for status, _ in results} == {200}
        assert {variant for _, variant in before} == {"static/chat-v1"}
        assert {variant for _, variant in after} == {"static/chat-v2"}


def test_api_keys_are_checked_once_and_limit_models(gateways, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "team-a").write_text("key-a\n")
    (keys / "team-b").write_text("key-b\n")
    config = FrontDoorConfig(static=gateways.backends(), api_keys_dir=str(keys), models_by_key={"team-a": ("chat",)})
    with RunningFrontDoor(config) as running:
        assert ask(running.url).status_code == 401
        assert ask(running.url, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        a = {"Authorization": "Bearer key-a"}
        assert [m["id"] for m in httpx.get(f"{running.url}/v1/models", headers=a).json()["data"]] == ["chat"]
        assert ask(running.url, headers=a).status_code == 200
        assert ask(running.url, None, headers=a).status_code == 200  # the one model this key may use
        denied = ask(running.url, "chat-v1", headers=a)
        assert denied.status_code == 404
        assert "Models served here: chat." in denied.json()["error"]["message"]
        assert ask(running.url, "chat-v1", headers={"Authorization": "Bearer key-b"}).status_code == 200


def test_metrics_per_model_and_variant(gateways) -> None:
    with RunningFrontDoor(FrontDoorConfig(static=gateways.backends(3, 1))) as running:
        for _ in range(3):
            assert ask(running.url, "chat-v2", stream=True).status_code == 200
        ask(running.url, "nope")
        text = httpx.get(f"{running.url}/metrics").text
    variant = {"model": "chat-v2", "variant": "static/chat-v2"}
    assert Metrics.parse(text).value("spotrag_frontdoor_requests_total", **variant, code="200") == 3
    assert Metrics.parse(text).value("spotrag_frontdoor_requests_total", model="", variant="", code="404") == 1
    assert Metrics.parse(text).value("spotrag_frontdoor_time_to_first_byte_seconds_count", **variant) == 3
    assert Metrics.parse(text).value("spotrag_frontdoor_inflight_requests", **variant) == 0
    assert Metrics.parse(text).value("spotrag_frontdoor_variant_share", model="chat", variant="static/chat-v1") == 0.75


# Moderation ------------------------------------------------------------------


def _answer(url: str, model: str, max_tokens: int) -> str:
    response = ask(url, model, max_tokens=max_tokens, temperature=0)
    return response.json()["choices"][0]["message"]["content"]


def test_moderation_blocks_a_question_and_redacts_pii(gateways) -> None:
    guarded = StaticBackend(
        "guarded",
        "guarded",
        gateways.v1.url,
        served_model_name="chat-v1",
        moderation={"blockList": ["contraband"], "redactPII": True, "output": False},
    )
    with RunningFrontDoor(FrontDoorConfig(static=(guarded,))) as running:
        blocked = ask(running.url, "guarded", messages=[{"role": "user", "content": "Can I bring CONTRABAND aboard?"}])
        assert blocked.status_code == 400
        assert blocked.json()["error"] == {
            "message": "The question was blocked by moderation (blocked_term).",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_filter",
            "reason": "blocked_term",
        }
        # Redaction happens at the door: the gateway gets the redacted question
        # (the emulator's prompt token count shows the body changed size).
        fine = ask(running.url, "guarded", messages=[{"role": "user", "content": "mail a@b.io"}])
        assert fine.status_code == 200
        text = httpx.get(f"{running.url}/metrics").text
    labels = {"model": "guarded", "variant": "static/guarded", "stage": "input"}
    assert (
        Metrics.parse(text).value(
            "spotrag_frontdoor_moderation_total", **labels, outcome="blocked", reason="blocked_term"
        )
        == 1
    )
    assert Metrics.parse(text).value("spotrag_frontdoor_moderation_total", **labels, outcome="redacted", reason="") == 1


def test_a_blocked_answer_is_cut_in_its_stream_before_the_blocked_window(gateways) -> None:
    plain = StaticBackend("plain", "plain", gateways.v1.url, served_model_name="chat-v1")
    with RunningFrontDoor(FrontDoorConfig(static=(plain,))) as running:
        answer = _answer(running.url, "plain", 48)
    words = [w.strip(".,;:!?") for w in answer.split()]
    # A word well into the answer, so earlier windows pass before it is reached.
    position = next(i for i in range(len(words) // 2, len(words)) if words[i].isalpha() and len(words[i]) > 3)
    term = words[position]
    guarded = StaticBackend(
        "guarded",
        "guarded",
        gateways.v1.url,
        served_model_name="chat-v1",
        moderation={"blockList": [term], "windowChars": 16},
    )
    with RunningFrontDoor(FrontDoorConfig(static=(guarded,))) as running:
        response = ask(running.url, "guarded", stream=True, max_tokens=48, temperature=0)
        whole = ask(running.url, "guarded", max_tokens=48, temperature=0)
        text = httpx.get(f"{running.url}/metrics").text
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["code"], error["reason"]) == ("content_filter", "blocked_term")
    sent = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e.get("choices"))
    assert sent and answer.startswith(sent)  # what got through is the answer's beginning
    assert term.lower() not in sent.lower()  # and the window holding the term never left
    assert whole.status_code == 400 and whole.json()["error"]["reason"] == "blocked_term"
    labels = {"model": "guarded", "variant": "static/guarded", "stage": "output"}
    assert (
        Metrics.parse(text).value(
            "spotrag_frontdoor_moderation_total", **labels, outcome="blocked", reason="blocked_term"
        )
        == 2
    )
    assert (
        Metrics.parse(text).value(
            "spotrag_frontdoor_requests_total", model="guarded", variant="static/guarded", code="content_filter"
        )
        == 1
    )


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("block", 503)])
async def test_a_hanging_checker_times_out_and_the_request_follows_the_choice(gateways, on_error, status) -> None:
    async with moderation_checker(hang=True) as checker:
        moderation = {"checker": {"url": checker["url"], "timeoutSeconds": 0.3, "onError": on_error}, "output": False}
        guarded = StaticBackend(
            "guarded", "guarded", gateways.v1.url, served_model_name="chat-v1", moderation=moderation
        )
        with RunningFrontDoor(FrontDoorConfig(static=(guarded,))) as running:
            async with httpx.AsyncClient(timeout=30) as client:
                body = {"model": "guarded", "messages": QUESTION, "max_tokens": 4}
                response = await client.post(f"{running.url}/v1/chat/completions", json=body)
                text = (await client.get(f"{running.url}/metrics")).text
        assert checker["inputs"] == [QUESTION[0]["content"]]
    assert response.status_code == status
    labels = {"model": "guarded", "variant": "static/guarded", "stage": "input"}
    if on_error == "allow":
        assert (
            Metrics.parse(text).value(
                "spotrag_frontdoor_moderation_total", **labels, outcome="checker_error", reason=""
            )
            == 1
        )
    else:
        assert response.json()["error"]["code"] == "moderation_unavailable"
        assert response.json()["error"]["reason"] == "checker_unavailable"


def test_the_rag_endpoint_through_the_door_with_its_question_redacted_and_its_answer_checked() -> None:
    """A gateway that retrieves (the bundled corpus's index, the real embedder):
    /v1/rag/query is routed like chat and moderated like it."""
    with running_engines(1, served_model_name="handbook") as [engine]:
        with RunningGateway(gateway_config([engine.url], servedModelName="handbook")) as gateway:
            moderation = {"redactPII": True, "blockList": ["zzyzx"]}
            backend = StaticBackend("handbook", "handbook", gateway.url, moderation=moderation)
            with RunningFrontDoor(FrontDoorConfig(static=(backend,))) as running:
                question = "How many pets can I bring? Reply to jane@example.com"
                answer = httpx.post(
                    f"{running.url}/v1/rag/query", json={"question": question, "max_tokens": 16}, timeout=60
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["passages"] and answer.json()["answer"]
                blocked = httpx.post(
                    f"{running.url}/v1/rag/query", json={"question": "what is zzyzx?", "max_tokens": 4}, timeout=60
                )
                text = httpx.get(f"{running.url}/metrics").text
    assert blocked.status_code == 400 and blocked.json()["error"]["reason"] == "blocked_term"
    labels = {"model": "handbook", "variant": "static/handbook", "stage": "input"}
    assert Metrics.parse(text).value("spotrag_frontdoor_moderation_total", **labels, outcome="redacted", reason="") == 1


async def test_what_reaches_the_gateway_is_the_redacted_question_under_its_served_name() -> None:
    """A recording HTTP server in the gateway's place shows the body the front door sends."""
    received: list[dict] = []

    async def chat_completions(request: web.Request) -> web.Response:
        received.append(await request.json())
        message = {"role": "assistant", "content": "Noted."}
        return web.json_response({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    backend = StaticBackend("chat", "v7", url, served_model_name="chat-v7", moderation={"redactPII": True})
    try:
        with RunningFrontDoor(FrontDoorConfig(static=(backend,))) as running:
            async with httpx.AsyncClient(timeout=30) as client:
                messages = [
                    {"role": "system", "content": "Be brief. Write to ops@example.com if unsure."},
                    {"role": "user", "content": [{"type": "text", "text": "Call me on +44 20 7946 0958 or a@b.io"}]},
                ]
                body = {"model": "chat", "messages": messages, "temperature": 0.2}
                response = await client.post(f"{running.url}/v1/chat/completions", json=body)
    finally:
        await runner.cleanup()
    assert response.status_code == 200
    assert received == [
        {
            "model": "chat-v7",
            "messages": [
                messages[0],  # only the question is moderated
                {"role": "user", "content": [{"type": "text", "text": "Call me on [phone] or [email]"}]},
            ],
            "temperature": 0.2,
        }
    ]


def test_a_client_that_leaves_mid_stream_closes_the_gateway_request(gateways) -> None:
    with RunningFrontDoor(FrontDoorConfig(static=gateways.backends(1, 0))) as running:
        before = Metrics.parse(httpx.get(f"{gateways.v1.url}/metrics").text).value(
            "spotrag_requests_total", outcome="cancelled"
        )
        body = {"model": "chat", "messages": QUESTION, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_bytes())  # the answer has started; now leave
        labels = {"model": "chat", "variant": "static/chat-v1"}

        def settled() -> bool:
            text = httpx.get(f"{running.url}/metrics").text
            return (
                Metrics.parse(text).value("spotrag_frontdoor_requests_total", **labels, code="499") == 1
                and Metrics.parse(text).value("spotrag_frontdoor_inflight_requests", **labels) == 0
            )

        eventually(settled, what="the front door to count the client gone")
        eventually(
            lambda: (
                Metrics.parse(httpx.get(f"{gateways.v1.url}/metrics").text).value(
                    "spotrag_requests_total", outcome="cancelled"
                )
                == before + 1
            ),
            what="the gateway to see its client (the front door) leave",
        )
