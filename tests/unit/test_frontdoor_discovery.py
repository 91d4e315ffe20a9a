"""The front door finding RAGDeployments, ModelRoutes and gateway endpoints
through the Kubernetes API stand-in over real HTTP (a kubeconfig, list and
watch), in front of real gateways: routing follows what the API says, a
ModelRoute's status reports its shares and missing backends, and a weight
change under load moves traffic without failing a request."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import kubernetes
import pytest
import yaml

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.testing import Program, eventually, kubectl, running_kube_api, spotrag_command
from spotrag_runtime.frontdoor.config import FrontDoorConfig

from .frontdoor_fixtures import RunningFrontDoor
from .gateway_fixtures import RunningGateway, gateway_config, running_engines

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "default"
GROUP, VERSION = "spotrag.io", "v1alpha1"


@contextlib.contextmanager
def _gateway(name: str) -> Iterator[RunningGateway]:
    with running_engines(1, served_model_name=name) as [engine]:
        config = gateway_config([engine.url], retrieval={"enabled": False}, servedModelName=name)
        with RunningGateway(config) as gateway:
            yield gateway


@pytest.fixture(scope="module")
def gateways() -> Iterator[dict[str, RunningGateway]]:
    with _gateway("chat-v1") as v1, _gateway("chat-v2") as v2:
        yield {"chat-v1": v1, "chat-v2": v2}


@pytest.fixture
def kube(tmp_path: Path):
    with KubeAPIServer() as api:
        api.apply_crd_file(ROOT / "crds" / "spotrag.io_ragdeployments.yaml")
        api.apply_crd_file(ROOT / "crds" / "spotrag.io_modelroutes.yaml")
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        with kubernetes.config.new_client_from_config(str(kubeconfig)) as client:
            yield kubernetes.client.CustomObjectsApi(client), kubernetes.client.DiscoveryV1Api(client), kubeconfig


def ragdeployment(name: str, **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RAGDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct", "servedModelName": name}, **spec},
    }


def modelroute(weights: dict[str, int]) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelRoute",
        "metadata": {"name": "chat", "namespace": NAMESPACE},
        "spec": {"backends": [{"ragDeployment": name, "weight": w} for name, w in weights.items()]},
    }


def gateway_slice(service: str, port: int) -> dict:
    """The EndpointSlice of a RAGDeployment's gateway Service (named as the RAGDeployment)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-abcde",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def _route_status(custom) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelroutes", "chat").get("status") or {}


def _ask(url: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_routes_follow_the_api_and_a_weight_change_under_load_fails_nothing(kube, gateways) -> None:
    custom, discovery, kubeconfig = kube
    for name, gateway in gateways.items():
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "ragdeployments", ragdeployment(name))
        discovery.create_namespaced_endpoint_slice(NAMESPACE, gateway_slice(name, int(gateway.url.rsplit(":", 1)[1])))
    custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "modelroutes", modelroute({"chat-v1": 100, "chat-v2": 0})
    )
    config = FrontDoorConfig(namespaces=(NAMESPACE,), address="endpointslices")
    with RunningFrontDoor(config, kubeconfig=str(kubeconfig)) as door:
        eventually(lambda: httpx.get(f"{door.url}/readyz").status_code == 200, what="the front door to list everything")
        assert httpx.get(f"{door.url}/readyz").json()["models"] == ["chat", "chat-v1", "chat-v2"]
        assert {_ask(door.url).headers["x-spotrag-variant"] for _ in range(6)} == {"default/chat-v1"}

        status = eventually(
            lambda: _route_status(custom).get("backends") and _route_status(custom), what="route status"
        )
        assert status["backends"] == "chat-v1=100%, chat-v2=0%"
        assert [(c["type"], c["status"]) for c in status["conditions"]] == [
            ("Accepted", "True"),
            ("ResolvedRefs", "True"),
        ]

        def one(i: int) -> tuple[int, str]:
            response = _ask(door.url, stream=i % 2 == 0)
            return response.status_code, response.headers.get("x-spotrag-variant", "")

        with ThreadPoolExecutor(6) as pool:
            during = [pool.submit(one, i) for i in range(30)]
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                "modelroutes",
                "chat",
                {
                    "spec": {
                        "backends": [
                            {"ragDeployment": "chat-v1", "weight": 0},
                            {"ragDeployment": "chat-v2", "weight": 100},
                        ]
                    }
                },
            )
            eventually(lambda: _ask(door.url).headers["x-spotrag-variant"] == "default/chat-v2", what="traffic to move")
            after = list(pool.map(one, range(12)))
        assert {status for status, _ in [f.result() for f in during] + after} == {200}
        assert {variant for _, variant in after} == {"default/chat-v2"}
        eventually(
            lambda: _route_status(custom).get("backends") == "chat-v1=0%, chat-v2=100%", what="the new shares in status"
        )

        # A backend that does not exist: reported in status and /v1/models, the other keeps serving.
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "modelroutes",
            "chat",
            {
                "spec": {
                    "backends": [{"ragDeployment": "chat-v2", "weight": 1}, {"ragDeployment": "chat-v3", "weight": 1}]
                }
            },
        )
        resolved = eventually(
            lambda: next(
                (
                    c
                    for c in _route_status(custom).get("conditions") or ()
                    if c["type"] == "ResolvedRefs" and c["status"] == "False"
                ),
                None,
            ),
            what="ResolvedRefs=False",
        )
        assert resolved["reason"] == "BackendNotFound"
        listing = httpx.get(f"{door.url}/v1/models").json()
        assert listing["spotrag_problems"] == [
            "ModelRoute default/chat: no RAGDeployment chat-v3 in default (or its spec is invalid)"
        ]
        assert _ask(door.url).headers["x-spotrag-variant"] == "default/chat-v2"

        # The gateway's endpoints leave (a deleted slice): 503 no_backend, not a hang.
        discovery.delete_namespaced_endpoint_slice("chat-v2-abcde", NAMESPACE)
        eventually(lambda: _ask(door.url).status_code == 503, what="chat to have no reachable backend")
        assert _ask(door.url).json()["error"]["code"] == "no_backend"

        # A RAGDeployment deleted: its model is gone from the list.
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "ragdeployments", "chat-v1")
        eventually(lambda: "chat-v1" not in httpx.get(f"{door.url}/readyz").json()["models"], what="chat-v1 to go")


def test_moderation_comes_from_the_ragdeployment_spec(kube, gateways) -> None:
    custom, discovery, kubeconfig = kube
    gateway = gateways["chat-v1"]
    custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "ragdeployments", ragdeployment("chat-v1", moderation={"blockList": ["contraband"]})
    )
    discovery.create_namespaced_endpoint_slice(NAMESPACE, gateway_slice("chat-v1", int(gateway.url.rsplit(":", 1)[1])))
    config = FrontDoorConfig(namespaces=(NAMESPACE,), address="endpointslices")
    with RunningFrontDoor(config, kubeconfig=str(kubeconfig)) as door:
        eventually(lambda: httpx.get(f"{door.url}/readyz").status_code == 200, what="the front door to list everything")
        body = {"model": "chat-v1", "messages": [{"role": "user", "content": "any contraband?"}], "max_tokens": 4}
        response = httpx.post(f"{door.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["reason"] == "blocked_term"
        # Only one model is served: no "model" needed.
        response = httpx.post(
            f"{door.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code == 200


def test_without_the_modelroute_crd_the_front_door_still_serves(tmp_path: Path, gateways) -> None:
    with KubeAPIServer() as api:
        api.apply_crd_file(ROOT / "crds" / "spotrag.io_ragdeployments.yaml")
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        with kubernetes.config.new_client_from_config(str(kubeconfig)) as client:
            kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "ragdeployments", ragdeployment("chat-v2")
            )
        with RunningFrontDoor(FrontDoorConfig(), kubeconfig=str(kubeconfig)) as door:
            eventually(lambda: httpx.get(f"{door.url}/readyz").status_code == 200, what="the front door to be ready")
            assert httpx.get(f"{door.url}/readyz").json()["models"] == ["chat-v2"]


def test_the_command_as_the_e2e_scenario_runs_it_with_kubectl_applied_objects(tmp_path: Path, gateways) -> None:
    """`spotrag front-door --config --kubeconfig` as a process; the ModelRoute CRD
    and objects applied with the real kubectl; its status read back with
    `kubectl get mroute` (the printer columns)."""
    gateway = gateways["chat-v1"]
    with running_kube_api(crds=[ROOT / "crds" / "spotrag.io_ragdeployments.yaml"]) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds" / "spotrag.io_modelroutes.yaml"))
        objects = [
            ragdeployment("chat-v1"),
            modelroute({"chat-v1": 3, "gone": 1}),
            gateway_slice("chat-v1", int(gateway.url.rsplit(":", 1)[1])),
        ]
        kubectl(kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all(objects))
        config = tmp_path / "frontdoor.json"
        config.write_text(json.dumps({"namespaces": [NAMESPACE], "address": "endpointslices"}))
        port = _free_port()
        argv = ["front-door", "--config", str(config), "--kubeconfig", str(kubeconfig), "--port", str(port)]
        program = Program("front-door", spotrag_command(*argv), tmp_path / "front-door.log")
        try:
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                program.check_alive()
                try:
                    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            eventually(ready, what="the front door process to be ready", timeout=60)
            assert _ask(url).headers["x-spotrag-variant"] == "default/chat-v1"
            printed = eventually(
                lambda: "chat-v1=100%" in (out := kubectl(kubeconfig, "get", "mroute", "-n", NAMESPACE).stdout) and out,
                what="the status in kubectl get",
            )
        finally:
            program.stop()
    header, row = printed.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "BACKENDS", "ACCEPTED", "RESOLVED", "AGE"]
    assert row.split()[:6] == ["chat", "chat", "chat-v1=100%,", "gone=0%", "True", "False"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
