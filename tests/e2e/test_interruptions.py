"""Spot interruptions under steady load, as a user of a RAGDeployment sees
them: every way a cluster announces that a spot node is going (AWS Node
Termination Handler, Karpenter, GKE, spotrag's own node agent), two nodes at
once, and the last spot engine going while spot is short. In each, a client
streams answers without pause through the gateway (the official `openai`
client), and not one request may fail: every answer must be complete and,
where the text is knowable (the box's engines answer deterministically),
exactly the text one engine writes without interruption.

Notices are shortened (the box's clock runs fast; see docs/cluster-in-a-box.md)
but keep their order and meaning: AWS and Karpenter 20 s instead of 2 min, GKE
8 s (shorter than the answers in flight, so they are resumed on another engine)
instead of 30 s, the node agent's GCP notice 10 s.

These scenarios need the simulated cluster: a real cloud does not take nodes
away on request (box_only).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import re
import threading
from collections.abc import Callable
from typing import Any, Self

import httpx
import openai
import pytest

from spotrag_box.testing import scrape
from spotrag_runtime.engine_emulator import text as emulator_text
from spotrag_runtime.node_agent.mark import Notice

pytestmark = pytest.mark.box_only

DEPLOYMENT = "spotty"
SERVED_MODEL = "qwen2.5-7b"  # examples/basic.yaml's servedModelName
# Every wait below ends long before this unless something is broken.
SCENARIO_TIMEOUT = 90.0

PLAIN_QUESTIONS = [
    "What keeps an answer alive when a spot node is taken back?",
    "How are queued tokens counted?",
    "Which engine gets the next request?",
    "Why does retrieval run on CPU?",
]
RAG_QUESTIONS = [
    "How many pets can one passenger bring on board?",
    "At what wind speed are sailings cancelled?",
]


# The client ---------------------------------------------------------------------


def expected_answer(question: str, *, max_tokens: int, ignore_eos: bool, answer_words: tuple[int, int]) -> str:
    """What the box's engine emulator answers to this one-message conversation
    (no retrieval): a pure function of the engines' seed (0, none is passed)
    and the conversation; `max_tokens` words, or its natural length if shorter."""
    continuation = emulator_text.chat_answer(
        [emulator_text.Message("user", question)], seed=0, answer_words=answer_words, continue_final_message=False
    )
    count = max_tokens if ignore_eos else min(continuation.natural_remaining, max_tokens)
    return "".join(itertools.islice(continuation.deltas, count))


@dataclasses.dataclass(frozen=True)
class Request:
    """One kind of request the load sends, and the answer it must get (None: not checkable)."""

    name: str
    question: str
    max_tokens: int
    rag: bool = False
    ignore_eos: bool = False
    expected: str | None = None


def plain_requests(e2e: Any, *, max_tokens: int = 64) -> list[Request]:
    """Chat without retrieval: the answer is checkable word for word in the box."""
    words = answer_words(e2e)
    return [
        Request(
            f"plain-{i}",
            q,
            max_tokens,
            expected=expected_answer(q, max_tokens=max_tokens, ignore_eos=False, answer_words=words) if words else None,
        )
        for i, q in enumerate(PLAIN_QUESTIONS)
    ]


def long_requests(e2e: Any, *, max_tokens: int) -> list[Request]:
    """Answers that run `max_tokens` tokens (ignore_eos), longer than a short notice."""
    words = answer_words(e2e)
    return [
        Request(
            f"long-{i}",
            q,
            max_tokens,
            ignore_eos=True,
            expected=expected_answer(q, max_tokens=max_tokens, ignore_eos=True, answer_words=words) if words else None,
        )
        for i, q in enumerate(PLAIN_QUESTIONS)
    ]


def answer_words(e2e: Any) -> tuple[int, int] | None:
    if not e2e.in_box:
        return None
    low, _, high = e2e.cluster.timing.engine_answer_words.partition(":")
    return int(low), int(high or low)


def chat(client: openai.OpenAI, request: Request) -> tuple[str, str | None]:
    """Stream one answer; the text and the finish reason the stream ended with."""
    extra: dict[str, Any] = {} if request.rag else {"rag": False}
    if request.ignore_eos:
        extra["ignore_eos"] = True
    stream = client.chat.completions.create(
        model=SERVED_MODEL,
        stream=True,
        max_tokens=request.max_tokens,
        messages=[{"role": "user", "content": request.question}],
        extra_body=extra,
    )
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish


class Load:
    """A bounded background client: `threads` loops, each streaming one
    request after another (cycling through `requests`) until stopped, every
    outcome kept. A failure is an exception, an answer without a finish
    reason (cut short), or a text other than the expected one."""

    def __init__(self, url: str, requests: list[Request], *, threads: int = 3, timeout: float = 60.0):
        self.url = url
        self.requests = requests
        self.timeout = timeout
        self.served = 0
        self.started = 0
        self.by_kind: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._initial = threads

    def __enter__(self) -> Self:
        self.add(self._initial)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def add(self, threads: int, requests: list[Request] | None = None) -> None:
        for _ in range(threads):
            thread = threading.Thread(
                target=self._loop, args=(len(self._threads), requests or self.requests), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 30)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self.failures.append(
                f"{len(alive)} client thread(s) still waiting for an answer {self.timeout + 30:.0f}s after the load stopped"
            )

    def _loop(self, index: int, requests: list[Request]) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="not-needed", max_retries=0, timeout=self.timeout)
        for number in itertools.count():
            if self._stop.is_set():
                return
            request = requests[(index + number) % len(requests)]
            with self._lock:
                self.started += 1
            try:
                text, finish = chat(client, request)
            except openai.OpenAIError as error:
                self._fail(f"{request.name}: {type(error).__name__}: {error}")
                continue
            if finish is None:
                self._fail(f"{request.name}: the stream ended without a finish_reason after {len(text.split())} words")
            elif not text:
                self._fail(f"{request.name}: an empty answer")
            elif request.expected is not None and text != request.expected:
                self._fail(
                    f"{request.name}: the answer differs from the uninterrupted one at character {_first_difference(text, request.expected)}: "
                    f"got {len(text.split())} words, expected {len(request.expected.split())}"
                )
            else:
                with self._lock:
                    self.served += 1
                    self.by_kind[request.name] = self.by_kind.get(request.name, 0) + 1

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# The cluster, as the scenarios read it ---------------------------------------------


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def engine_selector(deployment: str = DEPLOYMENT) -> str:
    return f"spotrag.io/deployment={deployment},spotrag.io/component=engine"


def live_engines(e2e: Any, namespace: str, deployment: str = DEPLOYMENT) -> list[Any]:
    return [p for p in e2e.pods(namespace, engine_selector(deployment)) if not p.metadata.deletion_timestamp]


def serving_engines(e2e: Any, namespace: str, capacity: str | None = None, deployment: str = DEPLOYMENT) -> list[Any]:
    return [
        p
        for p in live_engines(e2e, namespace, deployment)
        if p.metadata.labels.get("spotrag.io/serving") == "true"
        and ready(p)
        and (capacity is None or p.metadata.labels.get("spotrag.io/capacity") == capacity)
    ]


def steady(e2e: Any, namespace: str, *, spot: int, on_demand: int, deployment: str = DEPLOYMENT) -> Callable[[], bool]:
    """The deployment at rest: exactly the engines wanted, all serving and
    Ready, none draining or terminating, status agreeing."""

    def check() -> bool:
        pods = e2e.pods(namespace, engine_selector(deployment))
        if len(pods) != spot + on_demand or any(p.metadata.deletion_timestamp for p in pods):
            return False
        if (
            len(serving_engines(e2e, namespace, "spot", deployment)) != spot
            or len(serving_engines(e2e, namespace, "on-demand", deployment)) != on_demand
        ):
            return False
        status = (e2e.get_ragdeployment(namespace, deployment) or {}).get("status") or {}
        return status.get("readyReplicas") == status.get("desiredReplicas") == spot + on_demand

    return check


def wait_steady(
    e2e: Any,
    namespace: str,
    *,
    spot: int,
    on_demand: int,
    deployment: str = DEPLOYMENT,
    timeout: float = SCENARIO_TIMEOUT,
) -> None:
    e2e.wait_for(
        steady(e2e, namespace, spot=spot, on_demand=on_demand, deployment=deployment),
        namespace=namespace,
        timeout=timeout,
        what=f"{on_demand} on-demand and {spot} spot engines of {deployment} serving, none draining or terminating",
    )


def wait_served(e2e: Any, load: Load, namespace: str, more: int, what: str) -> None:
    target = load.served + more
    e2e.wait_for(
        lambda: load.served >= target or bool(load.failures),
        namespace=namespace,
        timeout=SCENARIO_TIMEOUT,
        what=f"{more} more answers {what} (served {load.served}, failures {load.failures[:3]})",
    )


def wait_out_of_serving(e2e: Any, namespace: str, names: set[str]) -> None:
    def out() -> bool:
        pods = {p.metadata.name: p for p in e2e.pods(namespace, engine_selector())}
        return all(
            name not in pods or pods[name].metadata.labels.get("spotrag.io/serving") == "false" for name in names
        )

    e2e.wait_for(
        out, namespace=namespace, timeout=30, what=f"engines {sorted(names)} to be labelled spotrag.io/serving=false"
    )


def wait_gone(e2e: Any, namespace: str, names: set[str]) -> None:
    e2e.wait_for(
        lambda: not names & {p.metadata.name for p in e2e.pods(namespace, engine_selector())},
        namespace=namespace,
        timeout=SCENARIO_TIMEOUT,
        what=f"engines {sorted(names)} to be deleted",
    )


def ragd_events(e2e: Any, namespace: str, deployment: str = DEPLOYMENT) -> list[Any]:
    return [
        e
        for e in e2e.core.list_namespaced_event(namespace).items
        if e.involved_object.kind == "RAGDeployment" and e.involved_object.name == deployment
    ]


def wait_event(e2e: Any, namespace: str, reason: str, *needles: str, deployment: str = DEPLOYMENT) -> Any:
    """The RAGDeployment's Event of `reason` whose message holds every needle."""

    def find() -> Any:
        return next(
            (
                e
                for e in ragd_events(e2e, namespace, deployment)
                if e.reason == reason and all(n in (e.message or "") for n in needles)
            ),
            None,
        )

    def diagnose() -> str:
        return "; ".join(f"{e.reason}: {e.message}" for e in ragd_events(e2e, namespace, deployment)[-12:])

    found = e2e.wait_for(
        find,
        namespace=namespace,
        timeout=30,
        what=f"an Event {reason} mentioning {needles} (last events: {diagnose()})",
    )
    return found


def spot_nodes(e2e: Any) -> dict[str, str]:
    """Live spot nodes of the simulated cloud → their pool."""
    return {node: pool for node, pool in e2e.cluster.nodes().items() if pool.startswith("gpu-spot-")}


def wait_cluster_whole(e2e: Any, namespace: str) -> None:
    """Spot back, every pool at its size, no notice pending: as the next scenario expects it."""
    e2e.cluster.set_spot_capacity(True)
    pools = {p.name: p.size for p in e2e.cluster.profile.pools}

    def whole() -> bool:
        nodes = e2e.cluster.nodes()
        counts = {name: sum(1 for pool in nodes.values() if pool == name) for name in pools}
        return counts == pools and not e2e.cluster.interruptions()

    e2e.wait_for(
        whole,
        namespace=namespace,
        timeout=60,
        what=f"every node pool back at its size {pools} with no notice pending (nodes: {e2e.cluster.nodes()})",
    )


def remove_deployment(e2e: Any, namespace: str, deployment: str) -> None:
    """After a scenario: the cluster whole again, the RAGDeployment deleted and its engines gone."""
    wait_cluster_whole(e2e, namespace)
    e2e.kubectl("delete", "ragdeployment", deployment, "-n", namespace, "--wait=false", check=False)
    e2e.wait_for(
        lambda: not e2e.pods(namespace, engine_selector(deployment)),
        namespace=namespace,
        timeout=60,
        what="the engines to be deleted",
    )


# The deployment ---------------------------------------------------------------------


@dataclasses.dataclass
class Deployed:
    namespace: str
    url: str
    rag: list[Request]  # corpus questions with the answer the gateway gave before any interruption


@pytest.fixture(scope="module")
def spotty(e2e, module_namespace):
    """examples/basic.yaml held at three engines (one on-demand baseline, two
    on spot), a quick spot fallback, Ready and answering."""
    namespace = module_namespace
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        scaling={"minReplicas": 3, "maxReplicas": 3, "onDemandBaseline": 1},
        spot={"fallbackAfterSeconds": 10, "retryAfterSeconds": 30},
        interruption={"drainTimeoutSeconds": 30},
    )
    e2e.apply([e2e.corpus_configmap(namespace), manifest])
    try:
        e2e.wait_ready(namespace, DEPLOYMENT)
        wait_steady(e2e, namespace, spot=2, on_demand=1, timeout=120)
        with e2e.service_url(namespace, DEPLOYMENT) as url:
            e2e.wait_for(lambda: _gateway_ready(url), what="the gateway's /readyz", namespace=namespace)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)
            # Retrieval is deterministic and so are the engines: the answer now is the answer later.
            rag = []
            for i, question in enumerate(RAG_QUESTIONS):
                request = Request(f"rag-{i}", question, 48, rag=True)
                text, finish = chat(client, request)
                assert text and finish, f"no answer to {question!r} before any interruption"
                rag.append(dataclasses.replace(request, expected=text))
            yield Deployed(namespace, url, rag)
    finally:
        remove_deployment(e2e, namespace, DEPLOYMENT)  # GPUs free for the next module


def _gateway_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def mixed(e2e: Any, deployed: Deployed) -> list[Request]:
    """Short plain answers (checked word for word) and RAG answers (checked against the one given before)."""
    return [*plain_requests(e2e), *deployed.rag]


def interrupted_engine(e2e: Any, namespace: str) -> Any:
    """A serving spot engine whose node has no notice yet."""
    pending = e2e.cluster.interruptions()
    candidates = [p for p in serving_engines(e2e, namespace, "spot") if p.spec.node_name not in pending]
    assert candidates, (
        f"no serving spot engine on a node without a notice: {[(p.metadata.name, p.spec.node_name) for p in live_engines(e2e, namespace)]}"
    )
    return candidates[0]


def check_drain_events(
    e2e: Any, namespace: str, victims: dict[str, str], signal: str, *, deleted_by_operator: bool = True
) -> None:
    """What `kubectl describe ragd` shows: the interruption (engine, node,
    signal) and, when the operator deleted the engine itself, how long it drained."""
    for pod, node in victims.items():
        wait_event(e2e, namespace, "EngineInterrupted", pod, node, signal)
        if deleted_by_operator:
            event = wait_event(e2e, namespace, "EngineDeleted", pod)
            assert re.search(r"after draining \d+s", event.message), event.message
    described = e2e.kubectl("describe", "ragd", DEPLOYMENT, "-n", namespace).stdout
    print(described[described.find("Events:") :])  # shown with -rA: what a user reads
    assert "EngineInterrupted" in described, described
    for pod, node in victims.items():
        assert pod in described and node in described, described


# The scenarios ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "style, signal",
    [("aws", "aws-node-termination-handler spot-interruption"), ("karpenter", "karpenter disrupted")],
    ids=["aws-nth-taint", "karpenter-taint"],
)
def test_a_two_minute_notice_drains_the_engine_before_the_node_goes(e2e, spotty, style, signal):
    """AWS gives 2 minutes (20 s here), relayed by NTH's taint and cordon or
    Karpenter's disrupted taint: the engine leaves serving, a replacement
    starts, the running answers finish, and the operator deletes the engine
    itself, long before the node goes."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    victim = interrupted_engine(e2e, namespace)
    name, node = victim.metadata.name, victim.spec.node_name
    with Load(spotty.url, mixed(e2e, spotty)) as load:
        wait_served(e2e, load, namespace, 3, "before the notice")
        e2e.cluster.interrupt_node(node, style=style, notice_seconds=20)
        wait_out_of_serving(e2e, namespace, {name})
        wait_gone(e2e, namespace, {name})
        wait_steady(e2e, namespace, spot=2, on_demand=1)
        assert node in e2e.cluster.interruptions(), (
            f"node {node} went before the drain ended: the scenario cannot tell a drain from a loss"
        )
        wait_served(e2e, load, namespace, 3, "after the replacement is serving")
    assert load.failures == []
    assert {p.spec.node_name for p in live_engines(e2e, namespace)}.isdisjoint({node})
    check_drain_events(e2e, namespace, {name: node}, signal)


def test_a_short_gke_notice_resumes_the_answers_still_running_on_another_engine(e2e, spotty):
    """GKE-style: a notice (8 s here) shorter than the answers in flight. The
    engine leaves serving at once; when its node goes, the gateway resumes
    each cut answer on another engine, and the client gets the same text as if
    nothing had happened."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    # ~1500 tokens at the box's 8 ms per token: well over the notice.
    long = long_requests(e2e, max_tokens=1500)
    resumed_before = scrape(f"{spotty.url}/metrics").value("spotrag_resumed_streams_total")
    with Load(spotty.url, long, threads=4, timeout=120) as load:

        def victim_busy() -> Any:
            pending = e2e.cluster.interruptions()
            return next(
                (
                    p
                    for p in serving_engines(e2e, namespace, "spot")
                    if p.spec.node_name not in pending and _running(p) > 0
                ),
                None,
            )

        victim = e2e.wait_for(
            victim_busy, namespace=namespace, timeout=30, what="a spot engine running one of the long answers"
        )
        name, node = victim.metadata.name, victim.spec.node_name
        e2e.cluster.interrupt_node(node, style="gke", notice_seconds=8)
        wait_out_of_serving(e2e, namespace, {name})
        e2e.wait_for(
            lambda: node not in e2e.cluster.nodes(),
            namespace=namespace,
            timeout=30,
            what=f"node {node} to be taken away after its notice",
        )
        e2e.wait_for(
            lambda: scrape(f"{spotty.url}/metrics").value("spotrag_resumed_streams_total") > resumed_before,
            namespace=namespace,
            timeout=30,
            what=f"the gateway to resume the answers cut on {name} (spotrag_resumed_streams_total still {resumed_before})",
        )
        wait_gone(e2e, namespace, {name})
        wait_steady(e2e, namespace, spot=2, on_demand=1)
        wait_served(e2e, load, namespace, 4, "after the node went")
    assert load.failures == []
    check_drain_events(e2e, namespace, {name: node}, "gke impending-termination", deleted_by_operator=False)


def test_a_drain_that_runs_out_is_resumed_elsewhere_with_the_same_text(e2e, spotty):
    """vLLM 0.26 as measured on the GPU machine (bench/vllm/contract.json): when
    --shutdown-timeout runs out with a stream open, its bytes stop and the
    connection stays open. Here a serving engine's pod is deleted under answers
    longer than its preStop (2 s) plus shutdown timeout (10 s): the gateway,
    which saw the engine leave serving, calls the silence a stall, drops the
    connection (so the engine can exit) and resumes each answer on another
    engine; the client gets the text one engine writes uninterrupted."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    # ~2,400 tokens at the box's 8 ms per token: ~19 s, past preStop + shutdown timeout.
    long = long_requests(e2e, max_tokens=2400)

    def gateway_metric(name: str) -> float:
        return scrape(f"{spotty.url}/metrics").value(name)

    stalled_before = gateway_metric("spotrag_stalled_streams_total")
    resumed_before = gateway_metric("spotrag_resumed_streams_total")
    with Load(spotty.url, long, threads=3, timeout=120) as load:
        victim = e2e.wait_for(
            lambda: next((p for p in serving_engines(e2e, namespace) if _running(p) > 0), None),
            namespace=namespace,
            timeout=30,
            what="a serving engine running one of the long answers",
        )
        name = victim.metadata.name
        e2e.core.delete_namespaced_pod(name, namespace)
        e2e.wait_for(
            lambda: gateway_metric("spotrag_stalled_streams_total") > stalled_before,
            namespace=namespace,
            timeout=60,
            what=f"the gateway to call {name}'s silent streams stalled once its shutdown timeout ran out",
        )
        e2e.wait_for(
            lambda: gateway_metric("spotrag_resumed_streams_total") > resumed_before,
            namespace=namespace,
            timeout=30,
            what="the stalled answers to be resumed on another engine",
        )
        wait_gone(e2e, namespace, {name})  # the engine exits once its stalled connections are dropped
        wait_steady(e2e, namespace, spot=2, on_demand=1)
        wait_served(e2e, load, namespace, 3, "after the drain ran out")
    assert load.failures == []


def _running(pod: Any) -> float:
    """vllm:num_requests_running of an engine, read from its pod IP (0 when unreadable)."""
    try:
        return scrape(f"http://{pod.status.pod_ip}:8000/metrics", timeout=2).value("vllm:num_requests_running")
    except httpx.HTTPError:
        return 0


def test_the_node_agents_mark_drains_like_any_other_signal(e2e, spotty):
    """No NTH, Karpenter or GKE handling in the cluster: spotrag's node agent
    read the cloud's notice (GCE preempted here, 10 s) and marked its Node the
    way it does (annotation with the deadline, NoSchedule taint); the instance
    goes at the deadline."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    victim = interrupted_engine(e2e, namespace)
    name, node = victim.metadata.name, victim.spec.node_name
    with Load(spotty.url, mixed(e2e, spotty)) as load:
        wait_served(e2e, load, namespace, 3, "before the notice")
        detected = datetime.datetime.now(datetime.UTC)
        notice = Notice(
            kind="interruption",
            cloud="gcp",
            deadline=detected + datetime.timedelta(seconds=10),
            detected=detected,
            ref="preempted=TRUE",
        )
        current = e2e.core.read_node(node)
        taints = [t.to_dict() for t in current.spec.taints or []] + [notice.taint()]
        e2e.core.patch_node(
            node,
            {
                "metadata": {"annotations": {"spotrag.io/interruption": notice.to_annotation()}},
                "spec": {"taints": taints},
            },
        )
        instance_gone = threading.Timer(10, e2e.cluster.terminate_node, args=(node,))
        instance_gone.start()
        try:
            wait_out_of_serving(e2e, namespace, {name})
            wait_gone(e2e, namespace, {name})
            wait_steady(e2e, namespace, spot=2, on_demand=1)
            wait_served(e2e, load, namespace, 3, "after the replacement is serving")
        finally:
            instance_gone.join()
    assert load.failures == []
    check_drain_events(e2e, namespace, {name: node}, "node-agent (gcp) interruption")


def test_two_nodes_at_once(e2e, spotty):
    """Both spot engines' nodes get a notice at the same moment (one by NTH,
    one by Karpenter): the on-demand baseline carries the load while two
    replacements start."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    pending = e2e.cluster.interruptions()
    victims = {
        p.metadata.name: p.spec.node_name
        for p in serving_engines(e2e, namespace, "spot")
        if p.spec.node_name not in pending
    }
    assert len(victims) == 2, f"expected two spot engines on nodes without a notice: {victims}"
    with Load(spotty.url, mixed(e2e, spotty), threads=4) as load:
        wait_served(e2e, load, namespace, 4, "before the notices")
        for node, style in zip(victims.values(), ("aws", "karpenter"), strict=False):
            e2e.cluster.interrupt_node(node, style=style, notice_seconds=20)
        wait_out_of_serving(e2e, namespace, set(victims))
        wait_gone(e2e, namespace, set(victims))
        wait_steady(e2e, namespace, spot=2, on_demand=1)
        wait_served(e2e, load, namespace, 4, "after both replacements are serving")
    assert load.failures == []
    assert not set(victims.values()) & {p.spec.node_name for p in live_engines(e2e, namespace)}
    for (name, node), signal in zip(victims.items(), ("aws-node-termination-handler", "karpenter"), strict=False):
        check_drain_events(e2e, namespace, {name: node}, signal)


def test_the_last_spot_engine_goes_while_spot_is_short(e2e, spotty):
    """One engine on spot, and the cloud has no spot left: when that last spot
    engine's node gets its notice, the replacement asked for on spot stays
    Pending, is given up after spot.fallbackAfterSeconds (10 s), and an
    on-demand engine takes its place. Nothing fails meanwhile."""
    namespace = spotty.namespace
    wait_steady(e2e, namespace, spot=2, on_demand=1)
    e2e.kubectl(
        "patch",
        "ragdeployment",
        DEPLOYMENT,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"scaling": {"minReplicas": 2, "maxReplicas": 2}}}),
    )
    wait_steady(e2e, namespace, spot=1, on_demand=1)
    # Earlier notices must have run out, so the spot nodes left are known.
    e2e.wait_for(
        lambda: not e2e.cluster.interruptions(),
        namespace=namespace,
        timeout=60,
        what=f"earlier notices to run out ({e2e.cluster.interruptions()})",
    )
    [victim] = serving_engines(e2e, namespace, "spot")
    name, node = victim.metadata.name, victim.spec.node_name
    try:
        with Load(spotty.url, mixed(e2e, spotty)) as load:
            wait_served(e2e, load, namespace, 3, "before spot runs out")
            # Spot runs out: no spot launch succeeds, and the spare spot nodes are gone.
            e2e.cluster.set_spot_capacity(False)
            for spare in set(spot_nodes(e2e)) - {node}:
                e2e.cluster.terminate_node(spare)
            e2e.cluster.interrupt_node(node, style="aws", notice_seconds=20)
            wait_out_of_serving(e2e, namespace, {name})

            def on_demand_replacement() -> bool:
                return len(serving_engines(e2e, namespace, "on-demand")) == 2

            e2e.wait_for(
                on_demand_replacement,
                namespace=namespace,
                timeout=SCENARIO_TIMEOUT,
                what="an on-demand engine to replace the spot engine whose replacement cannot be placed",
            )
            wait_gone(e2e, namespace, {name})
            wait_steady(e2e, namespace, spot=0, on_demand=2)
            wait_served(e2e, load, namespace, 3, "by the on-demand replacement")
        assert load.failures == []
        wait_event(e2e, namespace, "SpotShort")
        check_drain_events(e2e, namespace, {name: node}, "aws-node-termination-handler")
        status = e2e.get_ragdeployment(namespace, DEPLOYMENT)["status"]
        assert status["onDemandReplicas"] == 2 and status["spotReplicas"] == 0, status
    finally:
        wait_cluster_whole(e2e, namespace)
