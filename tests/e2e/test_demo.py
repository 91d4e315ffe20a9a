"""`spotrag demo` as a user runs it: the whole tour in the box ends with every
request answered; a missing prerequisite is named before anything starts."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.testing import spotrag_command

pytestmark = pytest.mark.box_only


def demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spotrag_command("demo", *args), capture_output=True, text=True, timeout=timeout)


def test_the_tour_answers_every_request_through_a_spot_interruption():
    done = demo("--duration", "10", "--notice-seconds", "8")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"First answer [\d.]+s after `spotrag demo` started", output), output
    assert re.search(
        r"interruption of gpu-spot-\S+: notice at [\d.]+s, its replacement engine ready at [\d.]+s, the node gone at [\d.]+s",
        output,
    ), output
    served = int(re.search(r"requests: (\d+) served", output).group(1))
    assert served > 0
    assert "0 failed" in output
    assert "What is real and what is simulated" in output
    assert re.search(r"Chat page: http://\S+/", output), output  # the page a newcomer opens


def test_a_busy_api_port_is_named_before_anything_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = demo("--api-port", str(port), timeout=60)
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use: pass another with --api-port (0 picks a free one)" in done.stderr


def test_a_missing_kubeconfig_is_a_usage_error(tmp_path):
    done = demo("--kubeconfig", str(tmp_path / "nope"), timeout=60)
    assert done.returncode == 2
    assert f"--kubeconfig {tmp_path / 'nope'}: no such file" in done.stderr


def test_a_cluster_without_spotrag_is_named(tmp_path):
    # --kubeconfig means "a real cluster": here an API server with no CRD installed.
    with KubeAPIServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        done = demo("--kubeconfig", str(kubeconfig), timeout=60)
    assert done.returncode == 2
    assert f"the cluster of {kubeconfig} has no RAGDeployment CRD" in done.stderr
    assert "install spotrag first" in done.stderr
