"""What the chat page stands on, over plain HTTP: the page and its assets at
``ui.path`` (or not at all), its settings, and ``/v1/rag/query`` streamed with
a conversation: the passages first, then the same answer as unstreamed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from spotrag_runtime.gateway import GatewayConfig
from spotrag_runtime.gateway.config import ConfigError

from .gateway_fixtures import SERVED_MODEL, RunningGateway, gateway_config, running_engines

QUESTION = "How many pets can one passenger bring on board?"


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with running_engines(1) as engines:
        config = gateway_config(
            [engine.url for engine in engines], admission={"maxTokensLimit": 1024, "defaultMaxTokens": 48}
        )
        with RunningGateway(config) as running:
            yield running


def events(response: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_the_page_its_assets_and_settings_are_served_at_the_root(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="/_ui/app.js"' in page.text and "Content-Security-Policy" in page.headers
        assert http.get("/_ui/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/_ui/style.css").headers["content-type"].startswith("text/css")
        assert http.get("/_ui/secrets.txt").status_code == 404
        settings = http.get("/_ui/config.json").json()
    assert settings == {
        "model": SERVED_MODEL,
        "deployment": "test",
        "retrieval": True,
        "topK": 4,
        "maxTokensLimit": 1024,
        "defaultMaxTokens": 48,
        "maxBodyBytes": 1_048_576,
        "auth": False,
    }


def test_the_page_moves_with_its_path_and_can_be_turned_off() -> None:
    for ui, page, absent in (({"path": "/chat"}, "/chat", "/"), ({"enabled": False}, None, "/")):
        config = gateway_config(["http://127.0.0.1:9"], retrieval={"enabled": False}, ui=ui)
        with RunningGateway(config) as running, httpx.Client(base_url=running.url, timeout=10) as http:
            if page:
                assert 'src="/chat/_ui/app.js"' in http.get(page).text
                assert http.get("/chat/").status_code == 200
                assert http.get("/chat/_ui/config.json").json()["retrieval"] is False
            assert http.get(absent).status_code == 404
            assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["chat", "/v1", "/v1/ui", "/metrics", "/a b", "//x"])
def test_a_page_path_that_is_no_path_or_the_apis_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="ui.path"):
        GatewayConfig.from_mapping({"servedModelName": "m", "ui": {"path": path}})


def test_a_streamed_rag_query_sends_the_passages_first_then_the_unstreamed_answer(gateway: RunningGateway) -> None:
    asked = {"question": QUESTION, "max_tokens": 30, "top_k": 2}
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        whole = http.post("/v1/rag/query", json=asked).json()
        streamed = http.post("/v1/rag/query", json={**asked, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    head, *chunks, usage, done = events(streamed)
    assert head["object"] == "rag.passages" and head["passages"] == whole["passages"]
    assert len(head["passages"]) == 2 and head["passages"][0]["source"] == "handbook/pets-onboard.md"
    assert {chunk["id"] for chunk in chunks} == {head["id"]}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole["answer"]
    assert usage["usage"] == whole["usage"] and done == "[DONE]"


def test_a_rag_query_keeps_the_conversation_it_is_given(gateway: RunningGateway) -> None:
    earlier = [{"role": "user", "content": "Can I bring my dog?"}, {"role": "assistant", "content": "Yes [1]."}]
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        alone = http.post("/v1/rag/query", json={"question": QUESTION, "max_tokens": 40}).json()
        followed = http.post("/v1/rag/query", json={"question": QUESTION, "messages": earlier, "max_tokens": 40}).json()
        refused = http.post("/v1/rag/query", json={"question": QUESTION, "messages": [{"role": "robot"}]})
    # The earlier turns reach the engine: more prompt, the same passages (retrieved for the question alone).
    assert followed["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]
    assert followed["passages"] == alone["passages"]
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("messages")


def test_the_spec_turns_the_page_off_or_moves_it() -> None:
    from spotrag_operator import render
    from spotrag_operator.crd import defaulted_spec

    from .operator_fixtures import ragdeployment

    def page(gateway_spec: dict) -> tuple[bool, str]:
        body = ragdeployment({"gateway": gateway_spec})
        ui = GatewayConfig.from_mapping(render.gateway_config(body, defaulted_spec(body))).ui
        return ui.enabled, ui.path

    assert page({}) == (True, "/")
    assert page({"ui": {"enabled": False}}) == (False, "/")
    assert page({"ui": {"path": "/chat"}}) == (True, "/chat")


@pytest.mark.parametrize(("path", "refused"), [("/chat", False), ("/", False), ("/v1/chat", True), ("/metrics", True)])
def test_the_crd_refuses_a_page_path_under_the_api(path: str, refused: bool) -> None:
    import yaml

    from spotrag_box.apiserver.crd_admission import validate_custom_resource
    from spotrag_operator.crd import CRD_PATH

    from .operator_fixtures import ragdeployment

    _, errors = validate_custom_resource(
        yaml.safe_load(CRD_PATH.read_text()), ragdeployment({"gateway": {"ui": {"path": path}}})
    )
    assert [error for error in errors if "ui.path" in str(error)] if refused else not errors
