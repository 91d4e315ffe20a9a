"""Engine discovery from EndpointSlices, watched through the Kubernetes API
stand-in over real HTTP with a kubeconfig, as a gateway out of a cluster
would; and the rule that turns slices into engine URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes
import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.testing import eventually, scrape
from spotrag_runtime.gateway.config import EnginesConfig
from spotrag_runtime.gateway.discovery import _engine_urls

from .gateway_fixtures import SERVED_MODEL, RunningGateway, direct_answer, gateway_config, running_engines

SERVICE = "demo-engines"


def endpoint_slice(name: str, port: int, *, ready: bool | None, service: str = SERVICE) -> dict:
    conditions = {} if ready is None else {"ready": ready}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": conditions}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[kubernetes.client.DiscoveryV1Api, Path]]:
    with KubeAPIServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        with kubernetes.config.new_client_from_config(str(kubeconfig)) as client:
            yield kubernetes.client.DiscoveryV1Api(client), kubeconfig


def served_requests(engine) -> float:
    return sum(
        scrape(f"{engine.url}/metrics").value("vllm:request_success_total", finished_reason=reason)
        for reason in ("stop", "length")
    )


def test_only_ready_endpoints_of_the_service_get_requests_and_a_drained_one_none(kube) -> None:
    discovery, kubeconfig = kube
    with running_engines(2) as (first, second):
        discovery.create_namespaced_endpoint_slice("default", endpoint_slice("engines-a", first.port, ready=True))
        discovery.create_namespaced_endpoint_slice("default", endpoint_slice("engines-b", second.port, ready=False))
        # Another Service's slice in the same namespace is none of ours.
        discovery.create_namespaced_endpoint_slice(
            "default", endpoint_slice("other", second.port, ready=True, service="other-service")
        )
        config = gateway_config(
            retrieval={"enabled": False},
            engines={"discovery": "endpointslices", "service": SERVICE, "namespace": "default"},
        )
        with RunningGateway(config, kubeconfig=str(kubeconfig)) as gateway, gateway.client() as client:

            def ask() -> None:
                client.chat.completions.create(
                    model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )

            assert httpx.get(f"{gateway.url}/readyz").json() == {"status": "ready", "engines": 1}
            for _ in range(3):
                ask()
            assert (served_requests(first), served_requests(second)) == (3, 0)

            discovery.patch_namespaced_endpoint_slice(
                "engines-b", "default", {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}
            )
            eventually(
                lambda: gateway.metric("spotrag_engines", state="serving") == 2, what="the second engine to join"
            )

            # Drain the first: the operator flips its serving label, it leaves the slice.
            discovery.patch_namespaced_endpoint_slice(
                "engines-a", "default", {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]}
            )
            eventually(
                lambda: gateway.metric("spotrag_engines", state="serving") == 1, what="the first engine to leave"
            )
            before = served_requests(first)
            for _ in range(4):
                ask()
            assert served_requests(first) == before
            assert served_requests(second) == 4

            discovery.delete_namespaced_endpoint_slice("engines-b", "default")
            eventually(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 503, what="no engine to be left")
            assert "no engine is serving" in httpx.get(f"{gateway.url}/readyz").json()["error"]["message"]


def test_an_answer_on_a_draining_engine_moves_on_soon_after_its_drain_runs_out(kube) -> None:
    discovery, kubeconfig = kube
    question = [{"role": "user", "content": "Tell me about the night ferry."}]
    long_answers = {"answer_words_min": 600, "answer_words_max": 600}
    with running_engines(2, itl_ms=15, shutdown_timeout=0.3, **long_answers) as engines:
        slices = {}
        for name, engine in zip(("engines-a", "engines-b"), engines, strict=True):
            discovery.create_namespaced_endpoint_slice("default", endpoint_slice(name, engine.port, ready=True))
            slices[engine.url] = name
        config = gateway_config(
            retrieval={"enabled": False},
            engines={"discovery": "endpointslices", "service": SERVICE, "namespace": "default"},
            # Above the read timeout (10 s): only the draining engine's bound can call this a stall.
            failover={"stallTimeoutSeconds": 60},
        )
        with RunningGateway(config, kubeconfig=str(kubeconfig)) as gateway, gateway.client() as client:
            eventually(lambda: gateway.metric("spotrag_engines", state="serving") == 2, what="both engines to serve")
            chunks = []
            for chunk in client.chat.completions.create(
                model=SERVED_MODEL, messages=question, max_tokens=400, stream=True
            ):
                chunks.append(chunk)
                if len(chunks) == 10:
                    victim = next(e for e in engines if gateway.metric("spotrag_engine_inflight_tokens", engine=e.url))
                    # The operator takes it out of serving, then the pod is deleted: preStop, SIGTERM,
                    # and 400 tokens take ~6 s, far past the 0.3 s shutdown timeout.
                    discovery.patch_namespaced_endpoint_slice(
                        slices[victim.url],
                        "default",
                        {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]},
                    )
                    eventually(
                        lambda: gateway.metric("spotrag_engines", state="serving") == 1, what="the victim to leave"
                    )
                    victim.terminate()
            survivor = next(e for e in engines if e is not victim)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == direct_answer(survivor, question, max_tokens=400)
            assert gateway.metric("spotrag_stalled_streams_total") == 1
            assert gateway.metric("spotrag_resumed_streams_total") == 1
        assert victim.wait(timeout=10) == 0  # the gateway dropped the stalled connection


CONFIG = EnginesConfig(discovery="endpointslices", service=SERVICE, port=8000)


@pytest.mark.parametrize(
    ("slices", "urls"),
    [
        ([endpoint_slice("a", 8001, ready=True)], ["http://127.0.0.1:8001"]),
        ([endpoint_slice("a", 8001, ready=False)], []),
        # Unknown readiness is not readiness: the engine may still be loading its model.
        ([endpoint_slice("a", 8001, ready=None)], []),
        ([{"endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": True, "terminating": True}}]}], []),
        # No ports in the slice: the configured port.
        (
            [{"endpoints": [{"addresses": ["10.0.0.7", "10.0.0.8"], "conditions": {"ready": True}}]}],
            ["http://10.0.0.7:8000"],
        ),
        (
            [
                {
                    "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8080}],
                    "endpoints": [{"addresses": ["fd00::7"], "conditions": {"ready": True}}],
                }
            ],
            ["http://[fd00::7]:8080"],
        ),
        (
            [endpoint_slice("a", 8001, ready=True), endpoint_slice("b", 8002, ready=True), {"endpoints": None}],
            ["http://127.0.0.1:8001", "http://127.0.0.1:8002"],
        ),
    ],
)
def test_slices_become_engine_urls(slices: list[dict], urls: list[str]) -> None:
    assert _engine_urls(slices, CONFIG) == urls
