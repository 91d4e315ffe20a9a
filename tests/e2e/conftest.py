"""Where the e2e scenarios run: in the box by default, on a real cluster when
SPOTRAG_E2E_KUBECONFIG names a kubeconfig.

In the box, three things start once per session, each the real program:
the Kubernetes API stand-in (`spotrag api-server`, its own process), the
simulated cluster (this process, its own thread; containers are processes)
and the operator (`spotrag operator`, its own process). On a real cluster
the operator runs from here too, unless SPOTRAG_E2E_OPERATOR=installed says
one is already running there (helm install).

Scenarios talk only to the Kubernetes API (kubectl and the `kubernetes`
client) and to the gateway's HTTP API, which they reach through the
gateway Service's EndpointSlice in the box and `kubectl port-forward` on a
cluster. A wait that runs out fails with a diagnosis of the namespace
(pods, their conditions and waiting reasons, Warning events, log tails).

Settings for a real cluster (all optional):
  SPOTRAG_E2E_KUBECONFIG     kubeconfig of the cluster (enables this mode)
  SPOTRAG_E2E_OPERATOR       "local" (default) or "installed"
  SPOTRAG_E2E_ENGINE_IMAGE   engine image (`vllm serve` inside): vLLM, or an emulator image
  SPOTRAG_E2E_MODEL          model the engines serve (default: the example's)
  SPOTRAG_E2E_RUNTIME_IMAGE  gateway and index image
  SPOTRAG_E2E_TIMEOUT        seconds for a deployment to become ready (default 300 there, 240 here)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from spotrag_box.cluster import SimulatedCluster, Timing
from spotrag_box.testing import Program, eventually, kubectl_binary, start_api_server, start_operator

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "spotrag.io_ragdeployments.yaml"
EXAMPLE = REPO / "examples" / "basic.yaml"
CORPUS = Path(str(resources.files("spotrag_runtime") / "data" / "corpus"))
REAL_KUBECONFIG = os.environ.get("SPOTRAG_E2E_KUBECONFIG")
READY_TIMEOUT = float(os.environ.get("SPOTRAG_E2E_TIMEOUT", "300" if REAL_KUBECONFIG else "240"))
START_TIMEOUT = 60.0

# Shortened so a scenario runs in seconds; the order of events is a real cluster's.
BOX_TIMING = Timing(image_pull=0.3, model_load=1.0, node_provision=5.0, probe_period=0.5, resync=2.0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "box_only: needs the simulated cluster (skipped on a real cluster)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
            if REAL_KUBECONFIG and item.get_closest_marker("box_only"):
                item.add_marker(pytest.mark.skip(reason="checks the simulated cluster itself"))


# Processes -------------------------------------------------------------------


# The environment -------------------------------------------------------------


@dataclasses.dataclass
class E2E:
    """What a scenario needs: the cluster's API, and helpers that wait with a diagnosis."""

    kubeconfig: Path
    workdir: Path
    cluster: SimulatedCluster | None  # None on a real cluster
    programs: list[Program]

    def __post_init__(self) -> None:
        self.api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.apps = kubernetes.client.AppsV1Api(self.api_client)
        self.batch = kubernetes.client.BatchV1Api(self.api_client)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)

    @property
    def in_box(self) -> bool:
        return self.cluster is not None

    # kubectl ---------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """The real kubectl. The stand-in serves no OpenAPI, so only there is validation off."""
        argv = list(args)
        if self.in_box and argv and argv[0] in ("apply", "create", "replace"):
            argv.insert(1, "--validate=false")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.workdir / "kubecache")}
        done = subprocess.run(
            [kubectl_binary(), *argv],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(f"kubectl {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
        return done

    def apply(self, obj: dict | list[dict]) -> None:
        docs = obj if isinstance(obj, list) else [obj]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    # Reads -----------------------------------------------------------------

    def get_ragdeployment(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object("spotrag.io", "v1alpha1", namespace, "ragdeployments", name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, namespace: str, selector: str = "") -> list[Any]:
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items

    # Waiting ----------------------------------------------------------------

    def wait_for(
        self,
        check: Callable[[], Any],
        *,
        what: str,
        namespace: str,
        timeout: float = READY_TIMEOUT,
        interval: float = 0.5,
    ) -> Any:
        """Poll `check` until truthy; fail with a diagnosis of `namespace` if it never is."""

        def checked() -> Any:
            for program in self.programs:
                program.check_alive()
            return check()

        return eventually(
            checked, what=what, timeout=timeout, interval=interval, diagnose=lambda: self.diagnose(namespace)
        )

    def diagnose(self, namespace: str) -> str:
        """What is wrong in `namespace`: unready pods and why, Warning events, logs."""
        lines = [f"--- namespace {namespace}"]
        for ragd in self.custom.list_namespaced_custom_object(
            "spotrag.io", "v1alpha1", namespace, "ragdeployments"
        ).get("items", []):
            status = ragd.get("status") or {}
            lines.append(f"RAGDeployment {ragd['metadata']['name']}: engines {status.get('engines')}")
            for condition in status.get("conditions") or []:
                lines.append(
                    f"  {condition['type']}={condition['status']} {condition.get('reason', '')}: {condition.get('message', '')}"
                )
        troubled = []
        for pod in self.pods(namespace):
            status = pod.status or kubernetes.client.V1PodStatus()
            conditions = {c.type: c for c in status.conditions or []}
            ready = conditions.get("Ready")
            line = f"pod {pod.metadata.name} on {pod.spec.node_name or '-'}: {status.phase}"
            if pod.metadata.deletion_timestamp:
                line += " (terminating)"
            for kind, condition in conditions.items():
                if condition.status != "True":
                    line += f"; {kind}=False {condition.reason or ''} {condition.message or ''}".rstrip()
            for container in status.container_statuses or []:
                if container.state.waiting:
                    line += f"; {container.name} waiting: {container.state.waiting.reason} {container.state.waiting.message or ''}".rstrip()
                if container.state.terminated:
                    line += f"; {container.name} terminated: exit {container.state.terminated.exit_code} {container.state.terminated.reason}"
                if container.restart_count:
                    line += f"; {container.name} restarts: {container.restart_count}"
            lines.append(line)
            if not ready or ready.status != "True":
                troubled.append(pod.metadata.name)
        warnings: dict[str, int] = {}
        for event in self.core.list_namespaced_event(namespace).items:
            if event.type == "Warning":
                text = (
                    f"event {event.involved_object.kind}/{event.involved_object.name}: {event.reason}: {event.message}"
                )
                warnings[text] = warnings.get(text, 0) + (event.count or 1)
        lines += [f"{text} (x{count})" if count > 1 else text for text, count in warnings.items()]
        for name in troubled[:4]:
            if self.cluster is not None:
                lines.append(self.cluster.pod_log(namespace, name, lines=15))
            else:
                lines.append(
                    self.kubectl("logs", "-n", namespace, name, "--all-containers", "--tail=15", check=False).stdout
                )
        for program in self.programs:
            if program.name == "operator":
                lines.append(f"--- operator log\n{program.tail(15)}")
        return "\n".join(lines)

    def wait_ready(self, namespace: str, name: str, *, timeout: float = READY_TIMEOUT) -> dict:
        """The RAGDeployment Ready (engines, index, gateways), as its status says."""

        def ready() -> dict | None:
            ragd = self.get_ragdeployment(namespace, name)
            conditions = {c["type"]: c for c in ((ragd or {}).get("status") or {}).get("conditions") or []}
            if conditions.get("Ready", {}).get("status") != "True":
                return None
            try:
                gateway = self.apps.read_namespaced_deployment(f"{name}-gateway", namespace)
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    return None
                raise
            ready = (gateway.status.ready_replicas if gateway.status else None) or 0
            return ragd if ready >= (gateway.spec.replicas or 1) else None

        return self.wait_for(
            ready,
            what=f"RAGDeployment {namespace}/{name} to be Ready with its gateways",
            namespace=namespace,
            timeout=timeout,
        )

    # What scenarios deploy ----------------------------------------------------

    @staticmethod
    def corpus_configmap(namespace: str, name: str = "handbook-docs") -> dict:
        """The bundled corpus as the ConfigMap the example's corpus names."""
        data = {}
        for folder in sorted((CORPUS / "docs").iterdir()):
            for path in sorted(folder.iterdir()):
                data[path.name] = path.read_text()
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": data,
        }

    @staticmethod
    def questions() -> list[dict]:
        """The corpus's questions, each with the document that answers it."""
        return [json.loads(line) for line in (CORPUS / "questions.jsonl").read_text().splitlines() if line.strip()]

    @staticmethod
    def ragdeployment_manifest(namespace: str, name: str = "handbook", **overrides: Any) -> dict:
        """examples/basic.yaml in `namespace`, with quick drains, one gateway,
        the engine image and model of SPOTRAG_E2E_* if set, and `overrides`
        merged into its spec (nested dicts merge)."""
        manifest = yaml.safe_load(EXAMPLE.read_text())
        manifest["metadata"] = {"name": name, "namespace": namespace}
        spec = manifest["spec"]
        spec.setdefault("gateway", {})["replicas"] = 1
        spec.setdefault("interruption", {})["preStopSeconds"] = 2
        spec["model"]["shutdownTimeoutSeconds"] = 10
        if image := os.environ.get("SPOTRAG_E2E_ENGINE_IMAGE"):
            spec["model"]["image"] = image
        if model := os.environ.get("SPOTRAG_E2E_MODEL"):
            spec["model"]["name"] = model
        if image := os.environ.get("SPOTRAG_E2E_RUNTIME_IMAGE"):
            spec["gateway"]["image"] = image
        _merge(spec, overrides)
        return manifest

    # Reaching the gateway ------------------------------------------------------

    @contextlib.contextmanager
    def service_url(self, namespace: str, service: str) -> Iterator[str]:
        """A base URL for a Service: its ready endpoint in the box (pod IPs are
        loopback addresses there), `kubectl port-forward` on a real cluster."""
        if self.in_box:

            def endpoint() -> str | None:
                slices = self.discovery.list_namespaced_endpoint_slice(
                    namespace, label_selector=f"kubernetes.io/service-name={service}"
                ).items
                for endpoint_slice in slices:
                    port = next((p.port for p in endpoint_slice.ports or [] if p.port), None)
                    for endpoint in endpoint_slice.endpoints or []:
                        if endpoint.conditions and endpoint.conditions.ready and port:
                            return f"http://{endpoint.addresses[0]}:{port}"
                return None

            yield self.wait_for(
                endpoint, what=f"a ready endpoint of Service {namespace}/{service}", namespace=namespace
            )
            return
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        forward = subprocess.Popen(
            [kubectl_binary(), "port-forward", "-n", namespace, f"svc/{service}", ":80"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            assert forward.stdout is not None
            line = forward.stdout.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not match:
                pytest.fail(
                    f"kubectl port-forward to {namespace}/{service} failed: {line}{forward.stdout.read(2000) if forward.poll() is not None else ''}"
                )
            yield f"http://127.0.0.1:{match.group(1)}"
        finally:
            os.killpg(forward.pid, signal.SIGTERM)
            forward.wait(10)


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    workdir = tmp_path_factory.mktemp("e2e")
    api: Program | None = None
    operator: Program | None = None
    cluster: SimulatedCluster | None = None
    try:
        if REAL_KUBECONFIG:
            kubeconfig = Path(REAL_KUBECONFIG)
        else:
            kubeconfig = workdir / "kubeconfig"
            api = start_api_server(kubeconfig, workdir / "api-server.log", crds=[CRD_FILE], timeout=START_TIMEOUT)
            cluster = SimulatedCluster(kubeconfig, workdir=workdir / "cluster", timing=BOX_TIMING).start()
        if not REAL_KUBECONFIG or os.environ.get("SPOTRAG_E2E_OPERATOR", "local") == "local":
            if REAL_KUBECONFIG:
                subprocess.run(
                    [kubectl_binary(), "--kubeconfig", str(kubeconfig), "apply", "--server-side", "-f", str(CRD_FILE)],
                    check=True,
                    capture_output=True,
                )
            # No fixed ports: other test sessions may share this machine.
            operator = start_operator(kubeconfig, workdir / "operator.log", reconcile_interval=1)
        programs = [p for p in (api, operator) if p is not None]
        yield E2E(kubeconfig=kubeconfig, workdir=workdir, cluster=cluster, programs=programs)
    finally:
        # The reverse of the start: the operator, the cluster's processes, the API.
        if operator is not None:
            operator.stop()
        if cluster is not None:
            cluster.stop()
        if api is not None:
            api.stop()


@pytest.fixture
def namespace(e2e: E2E, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (with all it holds)."""
    yield from _namespace(e2e, request.node.name)


@pytest.fixture(scope="module")
def module_namespace(e2e: E2E, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _namespace(e2e, request.module.__name__.rsplit(".", 1)[-1])


def _namespace(e2e: E2E, hint: str) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower().removeprefix("test_")).strip("-")[:40]
    name = f"e2e-{slug}-{secrets.token_hex(2)}"
    e2e.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    e2e.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _merge(into: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
