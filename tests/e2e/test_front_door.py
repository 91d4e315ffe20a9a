"""One endpoint for two RAGDeployments: the front door (`spotrag front-door`,
its own process, watching the box's API) in front of both gateways. A
ModelRoute splits one model name between them; a weight change under load
moves the traffic without failing a request; moderation blocks a question
and cuts a streamed answer.

In the box only: the front door reaches the gateways through their
EndpointSlices (loopback pod addresses here)."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from spotrag_box.testing import Program, scrape, spotrag_command

pytestmark = pytest.mark.box_only

REPO = Path(__file__).resolve().parents[2]
MODELROUTE_CRD = REPO / "crds" / "spotrag.io_modelroutes.yaml"
VARIANTS = ("handbook-a", "handbook-b")
MODEL = "handbook"
# Cuts any answer once it reaches 200 characters, whatever the engine writes
# (its answers run 64 to 192 words; the short requests here ask for 8 tokens).
LONG_ANSWER = r"^(?s:.){200}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def door(e2e, module_namespace):
    namespace = module_namespace
    e2e.apply(yaml.safe_load(MODELROUTE_CRD.read_text()))
    moderation = {"blockList": ["contraband"], "patterns": [LONG_ANSWER], "windowChars": 40}
    manifests = [e2e.corpus_configmap(namespace)]
    for name in VARIANTS:
        manifests.append(
            e2e.ragdeployment_manifest(namespace, name, model={"servedModelName": name}, moderation=moderation)
        )
    e2e.apply(manifests)
    e2e.apply(modelroute(namespace, {"handbook-a": 50, "handbook-b": 50}))
    for name in VARIANTS:
        e2e.wait_ready(namespace, name)
    config = e2e.workdir / f"frontdoor-{namespace}.json"
    config.write_text(json.dumps({"namespaces": [namespace], "address": "endpointslices"}))
    port = _free_port()
    program = Program(
        "front-door",
        spotrag_command(
            "front-door", "--config", str(config), "--kubeconfig", str(e2e.kubeconfig), "--port", str(port)
        ),
        e2e.workdir / f"frontdoor-{namespace}.log",
    )
    url = f"http://127.0.0.1:{port}"
    e2e.programs.append(program)
    try:

        def every_variant_reachable() -> bool:
            try:
                card = httpx.get(f"{url}/v1/models/{MODEL}", timeout=5).json()
            except httpx.HTTPError:
                return False
            variants = (card.get("spotrag") or {}).get("variants") or []
            return len(variants) == 2 and all(v["reachable"] for v in variants)

        e2e.wait_for(every_variant_reachable, what="the front door to reach both gateways", namespace=namespace)
        yield url, namespace
    finally:
        e2e.programs.remove(program)
        program.stop()


def modelroute(namespace: str, weights: dict[str, int]) -> dict:
    return {
        "apiVersion": "spotrag.io/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": MODEL, "namespace": namespace},
        "spec": {"backends": [{"ragDeployment": name, "weight": w} for name, w in weights.items()]},
    }


def chat(url: str, content: str = "How many pets can one passenger bring on board?", **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60)


def test_one_model_list_and_a_split_between_two_deployments(e2e, door):
    url, namespace = door
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert models == ["handbook", "handbook-a", "handbook-b"]
    seen = Counter(chat(url).headers["x-spotrag-variant"] for _ in range(40))
    assert set(seen) == {f"{namespace}/handbook-a", f"{namespace}/handbook-b"}

    def status() -> dict | None:
        route = e2e.custom.get_namespaced_custom_object("spotrag.io", "v1alpha1", namespace, "modelroutes", MODEL)
        return route.get("status") if (route.get("status") or {}).get("backends") else None

    written = e2e.wait_for(status, what="the ModelRoute's status", namespace=namespace, timeout=30)
    assert written["backends"] == "handbook-a=50%, handbook-b=50%"
    printed = e2e.kubectl("get", "modelroute", MODEL, "-n", namespace).stdout
    assert "handbook-a=50%, handbook-b=50%" in printed

    response = chat(url, model="handbook-c")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    no_model = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"


class Traffic:
    """Streams sent without pause from a few threads through the front door."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.variants: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                response = chat(self.url, stream=True)
                problem = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text}"
                if problem is None and '"error"' in response.text:
                    problem = f"an error in the stream: {response.text[-300:]}"
                with self._lock:
                    if problem:
                        self.failures.append(problem)
                    else:
                        self.variants.append(response.headers["x-spotrag-variant"])
            except httpx.HTTPError as error:
                with self._lock:
                    self.failures.append(repr(error))


def test_a_weight_change_under_load_moves_traffic_without_a_failed_request(e2e, door):
    url, namespace = door
    with Traffic(url) as traffic:
        e2e.wait_for(lambda: len(traffic.variants) >= 6, what="answers before the change", namespace=namespace)
        e2e.apply(modelroute(namespace, {"handbook-a": 0, "handbook-b": 100}))
        e2e.wait_for(
            lambda: chat(url).headers["x-spotrag-variant"] == f"{namespace}/handbook-b",
            what="traffic to move to handbook-b",
            namespace=namespace,
            timeout=30,
        )
        moved_at = len(traffic.variants)
        e2e.wait_for(lambda: len(traffic.variants) >= moved_at + 6, what="answers after", namespace=namespace)
    assert traffic.failures == []
    assert set(traffic.variants[moved_at + 3 :]) == {f"{namespace}/handbook-b"}


def test_moderation_blocks_a_question_and_cuts_an_answer(e2e, door):
    url, namespace = door
    blocked = chat(url, "Where do I hide the contraband?")
    assert blocked.status_code == 400
    assert (blocked.json()["error"]["code"], blocked.json()["error"]["reason"]) == ("content_filter", "blocked_term")

    response = chat(url, stream=True, max_tokens=120)
    assert response.status_code == 200
    events = [block[6:] for block in response.text.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["reason"]) == ("content_filter", "blocked_pattern")
    sent = "".join(
        (chunk["choices"][0]["delta"].get("content") or "")
        for chunk in map(json.loads, events[:-2])
        if chunk.get("choices")
    )
    assert 0 < len(sent) < 200  # the windows before the cut went out; the one that crossed 200 did not

    metrics = scrape(f"{url}/metrics")
    name = "spotrag_frontdoor_moderation_total"
    assert metrics.value(name, stage="input", outcome="blocked", reason="blocked_term") == 1
    assert metrics.value(name, stage="output", outcome="blocked", reason="blocked_pattern") == 1
