"""A RAGDeployment's life, as its user sees it through kubectl and the
gateway's OpenAI-compatible API: apply → engines Ready and answers grounded
in the documents; a spec change rolls the engines while requests keep being
answered; delete → nothing of it is left.

The same file runs in the box and, with SPOTRAG_E2E_KUBECONFIG, on a real
cluster (see conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import PurePosixPath

import httpx
import openai
import pytest

DEPLOYMENT = "handbook"
SERVED_MODEL = "qwen2.5-7b"  # examples/basic.yaml's servedModelName
REQUEST_THREADS = 3
# Share of the corpus's questions whose answering document must be among the
# passages retrieved (the index's own tests measure recall more finely).
MIN_RETRIEVAL_RECALL = 0.9


@dataclasses.dataclass(frozen=True)
class Deployed:
    namespace: str
    url: str


@pytest.fixture(scope="module")
def handbook(e2e, module_namespace):
    """examples/basic.yaml with the bundled corpus as its ConfigMap, Ready."""
    e2e.apply([e2e.corpus_configmap(module_namespace), e2e.ragdeployment_manifest(module_namespace, DEPLOYMENT)])
    e2e.wait_ready(module_namespace, DEPLOYMENT)
    with e2e.service_url(module_namespace, DEPLOYMENT) as url:
        e2e.wait_for(lambda: _ready(url), what="the gateway's /readyz", namespace=module_namespace)
        yield Deployed(module_namespace, url)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def engine_pods(e2e, namespace: str) -> list:
    return [
        p
        for p in e2e.pods(namespace, f"spotrag.io/deployment={DEPLOYMENT},spotrag.io/component=engine")
        if not p.metadata.deletion_timestamp
    ]


def test_engines_are_ready_and_answers_cite_the_documents_that_hold_them(e2e, handbook):
    ragd = e2e.get_ragdeployment(handbook.namespace, DEPLOYMENT)
    status = ragd["status"]
    assert status["readyReplicas"] == status["desiredReplicas"] == 1
    assert status["onDemandReplicas"] == 1  # the example keeps one engine on on-demand capacity
    [engine] = engine_pods(e2e, handbook.namespace)
    assert engine.metadata.labels["spotrag.io/capacity"] == "on-demand"
    if e2e.in_box:
        assert e2e.core.read_node(engine.spec.node_name).metadata.labels["box.spotrag.io/pool"].startswith("gpu-od-")

    client = openai.OpenAI(base_url=f"{handbook.url}/v1", api_key="not-needed", max_retries=0)
    assert SERVED_MODEL in [model.id for model in client.models.list()]

    questions = e2e.questions()
    misses, ungrounded = [], []
    for item in questions:
        answer = client.post(
            "/rag/query", body={"model": SERVED_MODEL, "question": item["question"], "max_tokens": 96}, cast_to=object
        )
        sources = {PurePosixPath(p["source"]).name for p in answer["passages"]}
        numbers = {p["number"] for p in answer["passages"]}
        expected = PurePosixPath(item["source"]).name
        if expected not in sources:
            misses.append(f"{item['question']!r}: expected {expected}, got {sorted(sources)}")
        # Grounded: the answer cites, and cites only passages it was given.
        cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer["answer"] or "")}
        if not cited or not cited <= numbers:
            ungrounded.append(
                f"{item['question']!r}: cites {sorted(cited)} of passages {sorted(numbers)}: {answer['answer']!r}"
            )
    assert ungrounded == []
    assert len(misses) <= (1 - MIN_RETRIEVAL_RECALL) * len(questions), "\n".join(misses)

    completion = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": "At what wind speed are sailings cancelled?"}],
        max_tokens=64,
    )
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


class Traffic:
    """Requests sent without pause from a few threads, every outcome kept."""

    def __init__(self, url: str):
        self.url = url
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(REQUEST_THREADS)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _loop(self, index: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="not-needed", max_retries=0, timeout=60)
        while not self._stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model=SERVED_MODEL,
                    stream=True,
                    max_tokens=48,
                    messages=[
                        {"role": "user", "content": f"How many pets can one passenger bring on board? ({index})"}
                    ],
                )
                text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
                with self._lock:
                    if text:
                        self.served += 1
                    else:
                        self.failures.append("an empty answer")
            except openai.OpenAIError as error:
                with self._lock:
                    self.failures.append(f"{type(error).__name__}: {error}")


def test_a_spec_change_rolls_the_engines_without_failing_a_request(e2e, handbook):
    namespace = handbook.namespace
    before = {p.metadata.name: p.metadata.labels["spotrag.io/spec-hash"] for p in engine_pods(e2e, namespace)}
    old_hash = e2e.get_ragdeployment(namespace, DEPLOYMENT)["status"]["engineSpecHash"]
    # A vLLM flag: engines need new pods; the gateways' config stays the same.
    extra_args = ["--max-num-seqs=48"] if "--max-num-seqs=48" not in str(before) else ["--max-num-seqs=32"]
    gateways = {p.metadata.name for p in e2e.pods(namespace, "spotrag.io/component=gateway")}

    with Traffic(handbook.url) as traffic:
        e2e.wait_for(
            lambda: traffic.served >= 3,
            what="requests to be answered before the change",
            namespace=namespace,
            timeout=60,
        )
        e2e.kubectl(
            "patch",
            "ragdeployment",
            DEPLOYMENT,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"model": {"extraArgs": extra_args}}}),
        )

        def rolled() -> bool:
            ragd = e2e.get_ragdeployment(namespace, DEPLOYMENT)
            status = ragd.get("status") or {}
            pods = e2e.pods(namespace, f"spotrag.io/deployment={DEPLOYMENT},spotrag.io/component=engine")
            return (
                status.get("engineSpecHash") not in (None, old_hash)
                and not set(before) & {p.metadata.name for p in pods}
                and status.get("readyReplicas") == status.get("desiredReplicas")
            )

        e2e.wait_for(rolled, what="the engines to be replaced by engines of the new spec", namespace=namespace)
        served_during_roll = traffic.served
        e2e.wait_for(
            lambda: traffic.served >= served_during_roll + 3,
            what="requests to be answered by the new engines",
            namespace=namespace,
            timeout=60,
        )

    assert traffic.failures == []
    new_engines = engine_pods(e2e, namespace)
    assert all(extra_args[0] in p.spec.containers[0].args for p in new_engines)
    assert {
        p.metadata.name for p in e2e.pods(namespace, "spotrag.io/component=gateway")
    } == gateways  # the gateways did not restart


def test_delete_leaves_nothing_behind(e2e, namespace):
    # Retrieval off: this scenario is about the children, not the index.
    e2e.apply(
        [
            e2e.corpus_configmap(namespace),
            e2e.ragdeployment_manifest(namespace, "short-lived", retrieval={"enabled": False}),
        ]
    )
    e2e.wait_ready(namespace, "short-lived")
    selector = "spotrag.io/deployment=short-lived"

    def children() -> list[str]:
        found = [f"pod/{p.metadata.name}" for p in e2e.pods(namespace, selector)]
        found += [
            f"service/{s.metadata.name}"
            for s in e2e.core.list_namespaced_service(namespace, label_selector=selector).items
        ]
        found += [
            f"configmap/{c.metadata.name}"
            for c in e2e.core.list_namespaced_config_map(namespace, label_selector=selector).items
        ]
        found += [
            f"deployment/{d.metadata.name}"
            for d in e2e.apps.list_namespaced_deployment(namespace, label_selector=selector).items
        ]
        found += [
            f"pvc/{c.metadata.name}"
            for c in e2e.core.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items
        ]
        found += [
            f"endpointslice/{s.metadata.name}" for s in e2e.discovery.list_namespaced_endpoint_slice(namespace).items
        ]
        return found

    assert any(c.startswith("pod/") for c in children())
    e2e.kubectl("delete", "ragdeployment", "short-lived", "-n", namespace, "--wait=true", "--timeout=120s", timeout=130)
    e2e.wait_for(
        lambda: not children(), what="every child of the RAGDeployment to be gone", namespace=namespace, timeout=120
    )
    if e2e.in_box:
        assert [p for p in e2e.cluster.processes() if p.namespace == namespace] == []
