"""Scale from zero with the real parts over HTTP: the operator (kopf against
the Kubernetes API stand-in) renders a gateway config for a RAGDeployment
with minReplicas 0; the real gateway (`spotrag gateway`, its own process,
reading that config and the stand-in's EndpointSlices) holds a streamed
request while no engine exists, keeps the stream alive with comments, and
its queued tokens make the operator create the first engine at once, though
the scale-up window is a minute."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from spotrag_operator import render
from spotrag_operator.crd import API_VERSION, KIND

from .test_operator import (  # noqa: F401  the fixtures too
    api,
    diagnose,
    engines,
    events_of,
    kube,
    kubeconfig,
    new_ragd,
    operator,
    wait_for,
)


def loopback_ip() -> str:
    """An address of its own, so the gateway can listen on its fixed port 8080."""
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_a_held_request_scales_a_deployment_at_zero_to_one_engine(
    operator,  # noqa: F811
    kube,  # noqa: F811
    kubeconfig,  # noqa: F811
    processes,
    tmp_path,
):
    body = new_ragd(
        kube,
        {
            "retrieval": {"enabled": False},
            "scaling": {
                "minReplicas": 0,
                "onDemandBaseline": 0,
                "targetQueuedTokensPerReplica": 10000,  # one held request needs one engine
                "scaleUpStabilizationSeconds": 60,
                "coldStartTimeoutSeconds": 120,
            },
        },
    )
    name = body["metadata"]["name"]
    describe = diagnose(kube, body)

    def ready_reason() -> str | None:
        status = kube.get(API_VERSION, KIND, name, "default").get("status") or {}
        return next((c["reason"] for c in status.get("conditions") or [] if c["type"] == "Ready"), None)

    wait_for(lambda: ready_reason() == "ScaledToZero", what="ScaledToZero", diagnose=describe)
    assert engines(kube, body) == []

    # The gateway as the operator configured it, at a pod address the operator scrapes.
    config_map = wait_for(lambda: kube.get("v1", "ConfigMap", f"{name}-gateway", "default"), what="gateway config")
    config = json.loads(config_map["data"]["gateway.json"])
    assert config["admission"]["queueWithoutEngines"] is True
    assert config["admission"]["coldStartTimeoutSeconds"] == 120
    config["admission"]["keepAliveSeconds"] = 0.2
    (tmp_path / "gateway.json").write_text(json.dumps(config))
    ip = loopback_ip()
    command = [sys.executable, "-m", "spotrag_runtime.gateway.cli", "--config", str(tmp_path / "gateway.json")]
    command += ["--kubeconfig", str(kubeconfig), "--host", ip, "--port", str(render.GATEWAY_PORT)]
    command += ["--log-level", "warning"]
    with (tmp_path / "gateway.log").open("w") as log:  # the child keeps its own copy of the descriptor
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    url = f"http://{ip}:{render.GATEWAY_PORT}"

    def gateway_ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(
        gateway_ready, what="the gateway ready with no engine", diagnose=lambda: (tmp_path / "gateway.log").read_text()
    )
    pod = kube.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-gateway-0", "namespace": "default", "labels": render.gateway_selector(body)},
            "spec": {"containers": [{"name": "gateway", "image": "spotrag"}]},
        }
    )
    status = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    kube.patch("v1", "Pod", pod["metadata"]["name"], {"status": status}, "default", subresource="status")

    # A streamed question while no engine exists: held, kept alive, counted.
    received: list[bytes] = []
    request = {"model": config["servedModelName"], "messages": [{"role": "user", "content": "hi"}], "stream": True}

    def ask() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=60) as response:
                received.append(str(response.status_code).encode())
                for chunk in response.iter_bytes():
                    received.append(chunk)
        except httpx.HTTPError:
            pass

    threading.Thread(target=ask, daemon=True).start()
    wait_for(lambda: b": waiting for an engine" in b"".join(received), what="a keep-alive comment")
    assert received[0] == b"200"

    [engine] = wait_for(lambda: engines(kube, body), what="the first engine", diagnose=describe)
    assert engine["metadata"]["labels"][render.LABEL_SERVING] == "true"
    [scaled] = wait_for(
        lambda: [e for e in events_of(kube, body) if e.reason == "Scaled" and "0 → 1" in e.message],
        what="the Scaled Event",
    )
    assert "from zero" in scaled.message
    assert kube.get(API_VERSION, KIND, name, "default")["status"]["desiredReplicas"] == 1
