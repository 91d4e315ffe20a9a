"""The simulated cluster itself, through the Kubernetes API and real kubectl:
pods become processes that serve and stop the way a kubelet stops them,
the scheduler says why a pod cannot run, a spot interruption marks the node
and then takes it and its pods away, pools refill when capacity returns,
Deployments roll and Jobs retry."""

from __future__ import annotations

import threading

import httpx
import pytest

from spotrag_box.testing import scrape

pytestmark = pytest.mark.box_only

SPOT_POOL_A = "gpu-spot-a"
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def engine_container(
    *, model: str = "box-model", max_model_len: int = 2048, shutdown_timeout: int = 5, pre_stop: int = 1
) -> dict:
    """A vLLM container as the operator renders one (the box runs the engine emulator for it)."""
    return {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.26.0",
        "command": ["vllm", "serve"],
        "args": [
            "Qwen/Qwen2.5-7B-Instruct",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            model,
            "--max-model-len",
            str(max_model_len),
            "--shutdown-timeout",
            str(shutdown_timeout),
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(pre_stop)]}}},
    }


def engine_pod(
    namespace: str, name: str, *, labels: dict | None = None, node_selector: dict | None = None, **container: object
) -> dict:
    spec = {
        "terminationGracePeriodSeconds": 30,
        "tolerations": TOLERATE_GPU,
        "containers": [engine_container(**container)],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": spec,
    }


def service(namespace: str, name: str, selector: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": "http", "port": 8000, "targetPort": "http"}],
        },
    }


def condition_of(pod, kind: str):
    conditions = (
        pod.status.conditions if pod.status else None
    ) or []  # no status until a kubelet or scheduler writes one
    return next((c for c in conditions if c.type == kind), None)


def pod_condition(e2e, namespace: str, name: str, kind: str):
    return condition_of(e2e.core.read_namespaced_pod(name, namespace), kind)


def ready(pod) -> bool:
    condition = condition_of(pod, "Ready")
    return condition is not None and condition.status == "True"


def is_ready(e2e, namespace: str, name: str) -> bool:
    return ready(e2e.core.read_namespaced_pod(name, namespace))


def pod_gone(e2e, namespace: str, name: str) -> bool:
    return not any(p.metadata.name == name for p in e2e.pods(namespace))


def processes_of(e2e, namespace: str, pod: str) -> list:
    return [p for p in e2e.cluster.processes() if p.namespace == namespace and p.pod == pod]


def endpoints(e2e, namespace: str, service_name: str) -> list[tuple]:
    """(pod, ready, serving, terminating, url) per endpoint of the Service."""
    found = []
    for endpoint_slice in e2e.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service_name}"
    ).items:
        port = endpoint_slice.ports[0].port if endpoint_slice.ports else None
        for endpoint in endpoint_slice.endpoints or []:
            c = endpoint.conditions
            found.append(
                (endpoint.target_ref.name, c.ready, c.serving, c.terminating, f"http://{endpoint.addresses[0]}:{port}")
            )
    return found


def running_requests(url: str) -> float:
    """vllm:num_requests_running from the engine's /metrics."""
    return scrape(f"{url}/metrics").value("vllm:num_requests_running")


def test_engine_pod_serves_then_finishes_its_request_while_stopping(e2e, namespace):
    e2e.apply(
        [
            service(namespace, "engine", {"app": "engine"}),
            engine_pod(namespace, "engine", model="box-model", max_model_len=2048, shutdown_timeout=10, pre_stop=2),
        ]
    )
    e2e.wait_for(lambda: is_ready(e2e, namespace, "engine"), what="the engine pod to be Ready", namespace=namespace)
    pod = e2e.core.read_namespaced_pod("engine", namespace)
    assert pod.status.pod_ip.startswith("127.") and pod.status.pod_ip != "127.0.0.1"  # an address of its own
    assert pod.spec.node_name.startswith("gpu-")
    [(name, ready, serving, terminating, url)] = e2e.wait_for(
        lambda: endpoints(e2e, namespace, "engine"), what="an EndpointSlice for the engine", namespace=namespace
    )
    assert (name, ready, serving, terminating, url) == ("engine", True, True, False, f"http://{pod.status.pod_ip}:8000")

    # The flags vLLM shares with the emulator reach it from the pod's args.
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("box-model", 2048)]

    # A long answer in flight while the pod is deleted: preStop, then SIGTERM,
    # then vLLM's --shutdown-timeout lets it finish.
    outcome: dict = {}

    def ask() -> None:
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "box-model", "prompt": "Tell a long story.", "max_tokens": 400, "ignore_eos": True},
            timeout=60,
        )
        outcome["status"] = response.status_code
        outcome["body"] = response.json()

    asker = threading.Thread(target=ask)
    asker.start()
    e2e.wait_for(
        lambda: running_requests(url) == 1, what="the request to be running", namespace=namespace, interval=0.05
    )
    e2e.kubectl("delete", "pod", "engine", "-n", namespace, "--wait=false")
    assert e2e.core.read_namespaced_pod("engine", namespace).metadata.deletion_timestamp is not None
    e2e.wait_for(
        lambda: [(n, r, t) for n, r, _, t, _ in endpoints(e2e, namespace, "engine")] == [("engine", False, True)],
        what="the endpoint to turn terminating and not ready",
        namespace=namespace,
    )
    asker.join(60)
    assert outcome["status"] == 200
    assert outcome["body"]["usage"]["completion_tokens"] == 400
    e2e.wait_for(
        lambda: pod_gone(e2e, namespace, "engine"),
        what="the pod to be removed after its process exited",
        namespace=namespace,
    )
    assert processes_of(e2e, namespace, "engine") == []
    assert endpoints(e2e, namespace, "engine") == []


def test_a_pod_that_fits_nowhere_stays_pending_with_the_schedulers_reason(e2e, namespace):
    pod = engine_pod(namespace, "huge")
    for where in ("requests", "limits"):
        pod["spec"]["containers"][0]["resources"][where]["nvidia.com/gpu"] = "8"
    e2e.apply(pod)

    def unschedulable():
        condition = pod_condition(e2e, namespace, "huge", "PodScheduled")
        return condition if condition is not None and condition.status == "False" else None

    condition = e2e.wait_for(unschedulable, what="PodScheduled=False", namespace=namespace)
    assert condition.reason == "Unschedulable"
    nodes = len(e2e.cluster.nodes())
    assert condition.message == f"0/{nodes} nodes are available: {nodes} Insufficient nvidia.com/gpu."

    # The scheduler writes the condition, then the Event (kube-scheduler orders them no more strictly).
    def failed_scheduling_event():
        events = e2e.core.list_namespaced_event(namespace, field_selector="involvedObject.name=huge").items
        return [e for e in events if e.reason == "FailedScheduling" and e.type == "Warning"]

    e2e.wait_for(failed_scheduling_event, what="a FailedScheduling Warning Event", namespace=namespace)
    assert e2e.core.read_namespaced_pod("huge", namespace).status.phase == "Pending"


def test_spot_shortage_interruption_and_refill(e2e, namespace):
    """Two engines fill the zone-a spot pool; with spot capacity out in that
    zone, one node gets an AWS notice, is cordoned and tainted, then goes with
    its engine; a third engine waits Pending until capacity returns and the
    pool launches a replacement."""
    cluster = e2e.cluster
    pool = {"box.spotrag.io/pool": SPOT_POOL_A}
    pool_nodes = lambda: sorted(n for n, p in cluster.nodes().items() if p == SPOT_POOL_A)  # noqa: E731
    assert len(pool_nodes()) == 2
    e2e.apply(
        [engine_pod(namespace, name, node_selector=pool, labels={"app": "fill"}) for name in ("fill-1", "fill-2")]
    )
    e2e.wait_for(
        lambda: all(is_ready(e2e, namespace, n) for n in ("fill-1", "fill-2")),
        what="both engines Ready",
        namespace=namespace,
    )
    victim = e2e.core.read_namespaced_pod("fill-1", namespace).spec.node_name

    cluster.set_spot_capacity(False, zone="us-east-1a")
    try:
        interruption = cluster.interrupt_node(victim, style="aws", notice_seconds=3)
        node = e2e.core.read_node(victim)
        assert node.spec.unschedulable is True
        assert {(t.key, t.value, t.effect) for t in node.spec.taints} >= {
            ("aws-node-termination-handler/spot-itn", interruption.event_id[:63], "NoSchedule")
        }
        assert node.metadata.labels["aws-node-termination-handler/event-id"] == interruption.event_id[:63]

        e2e.wait_for(lambda: victim not in cluster.nodes(), what=f"node {victim} to be terminated", namespace=namespace)
        e2e.wait_for(
            lambda: pod_gone(e2e, namespace, "fill-1"),
            what="the pod of the lost node to be collected",
            namespace=namespace,
        )
        assert processes_of(e2e, namespace, "fill-1") == []
        assert is_ready(e2e, namespace, "fill-2")

        e2e.apply(engine_pod(namespace, "waiting", node_selector=pool))

        def unschedulable():
            condition = pod_condition(e2e, namespace, "waiting", "PodScheduled")
            return condition if condition is not None and condition.status == "False" else None

        condition = e2e.wait_for(unschedulable, what="the third engine to be unschedulable", namespace=namespace)
        assert "1 Insufficient nvidia.com/gpu" in condition.message
        assert len(pool_nodes()) == 1
    finally:
        cluster.set_spot_capacity(True, zone="us-east-1a")
    e2e.wait_for(lambda: len(pool_nodes()) == 2, what="the pool to launch a replacement node", namespace=namespace)
    e2e.wait_for(
        lambda: is_ready(e2e, namespace, "waiting"),
        what="the waiting engine to run on the new node",
        namespace=namespace,
    )
    assert e2e.core.read_namespaced_pod("waiting", namespace).spec.node_name not in (
        victim,
        e2e.core.read_namespaced_pod("fill-2", namespace).spec.node_name,
    )


@pytest.mark.parametrize(
    ("style", "taint"),
    [("karpenter", "karpenter.sh/disrupted"), ("gke", "cloud.google.com/impending-node-termination")],
)
def test_notice_styles_taint_the_node_as_each_tool_does(e2e, namespace, style, taint):
    cluster = e2e.cluster
    node = sorted(n for n, p in cluster.nodes().items() if p == "gpu-spot-b")[0]
    cluster.interrupt_node(node, style=style, notice_seconds=1)
    noticed = e2e.core.read_node(node)
    assert [t.effect for t in noticed.spec.taints if t.key == taint] == ["NoSchedule"]
    events = e2e.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={node}").items
    assert any(e.type == "Warning" and e.involved_object.kind == "Node" for e in events)
    e2e.wait_for(lambda: node not in cluster.nodes(), what=f"node {node} to go", namespace=namespace)
    e2e.wait_for(
        lambda: len([p for p in cluster.nodes().values() if p == "gpu-spot-b"]) == 2,
        what="the pool to refill",
        namespace=namespace,
    )


def test_deployment_rolls_with_no_gap_in_ready_pods(e2e, namespace):
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"tolerations": TOLERATE_GPU, "containers": [engine_container(max_model_len=2048)]},
            },
        },
    }
    e2e.apply([deployment, service(namespace, "web", labels)])
    e2e.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=120s", timeout=130)
    first = {p.metadata.name for p in e2e.pods(namespace, "app=web")}
    assert len(first) == 2

    deployment["spec"]["template"]["spec"]["containers"][0]["args"][-3] = "4096"  # --max-model-len
    e2e.apply(deployment)
    fewest_ready = 2

    def rolled() -> bool:
        nonlocal fewest_ready
        pods = e2e.pods(namespace, "app=web")
        serving = [p for p in pods if not p.metadata.deletion_timestamp and ready(p)]
        fewest_ready = min(fewest_ready, len(serving))
        names = {p.metadata.name for p in pods}
        return not (names & first) and len(serving) == 2

    e2e.wait_for(rolled, what="the rollout to replace both pods", namespace=namespace, interval=0.1)
    assert fewest_ready == 2  # maxUnavailable 0: never fewer ready pods than replicas
    status = e2e.apps.read_namespaced_deployment("web", namespace).status
    assert (status.replicas, status.updated_replicas, status.ready_replicas) == (2, 2, 2)
    urls = [url for *_, url in endpoints(e2e, namespace, "web")]
    assert len(urls) == 2
    assert {httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] for url in urls} == {4096}


def test_jobs_complete_or_fail_after_their_retries(e2e, namespace):
    def job(name: str, command: list[str]) -> dict:
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "backoffLimit": 1,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "ghcr.io/spotrag/runtime:0.1.0",
                                "command": command,
                                "terminationMessagePolicy": "FallbackToLogsOnError",
                            }
                        ],
                    }
                },
            },
        }

    e2e.apply([job("works", ["spotrag", "--help"]), job("breaks", ["spotrag", "no-such-command"])])

    def finished(name: str):
        status = e2e.batch.read_namespaced_job(name, namespace).status  # None until the controller writes it
        conditions = (status.conditions if status else None) or []
        return next((c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None)

    assert e2e.wait_for(lambda: finished("works"), what="Job works to finish", namespace=namespace).type == "Complete"
    failed = e2e.wait_for(lambda: finished("breaks"), what="Job breaks to finish", namespace=namespace)
    assert (failed.type, failed.reason) == ("Failed", "BackoffLimitExceeded")
    attempts = e2e.pods(namespace, "job-name=breaks")
    assert len(attempts) == 2  # the first try and one retry
    messages = {c.state.terminated.message for p in attempts for c in p.status.container_statuses}
    assert all("unknown command 'no-such-command'" in m for m in messages)
    assert e2e.batch.read_namespaced_job("works", namespace).status.succeeded == 1


def test_a_container_the_box_cannot_run_says_so(e2e, namespace):
    e2e.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "shell", "namespace": namespace},
            "spec": {"containers": [{"name": "shell", "image": "busybox:1.36", "command": ["sleep", "3600"]}]},
        }
    )

    def waiting():
        status = e2e.core.read_namespaced_pod("shell", namespace).status
        statuses = (status.container_statuses if status else None) or []
        return (
            statuses[0].state.waiting
            if statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason != "ContainerCreating"
            else None
        )

    state = e2e.wait_for(waiting, what="the container to fail to start", namespace=namespace)
    assert state.reason == "CreateContainerError"
    assert "runs only vLLM (`vllm serve`) and spotrag (`spotrag ...`) containers" in state.message
    assert "busybox:1.36" in state.message
