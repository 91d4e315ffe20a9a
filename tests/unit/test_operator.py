"""The real operator (kopf) against the Kubernetes API stand-in over HTTP.

Nothing is patched: the operator reads and writes through the `kubernetes`
client and kopf's own HTTP client, and the tests look at the same API. With
no kubelet here, the tests play it: they mark engine pods Ready through the
API as a kubelet would.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import kopf.testing
import kubernetes
import prometheus_client
import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.testing import kubectl
from spotrag_operator import render
from spotrag_operator.crd import API_VERSION, KIND
from spotrag_operator.handlers import OperatorConfig, register
from spotrag_runtime.kube import Kube, api_client, label_selector

from .operator_fixtures import ROOT, load_example

CRD = ROOT / "crds" / "spotrag.io_ragdeployments.yaml"


def wait_for(
    check: Callable[[], Any], *, timeout: float = 20, what: str, diagnose: Callable[[], str] | None = None
) -> Any:
    """Poll until `check()` is truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            detail = diagnose() if diagnose else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}. {detail}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with KubeAPIServer() as server:
        server.apply_crd_file(CRD)
        yield server


@pytest.fixture(scope="module")
def kubeconfig(api, tmp_path_factory) -> pathlib.Path:
    return api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def kube(kubeconfig) -> Kube:
    return Kube(api_client(str(kubeconfig)))


@pytest.fixture(scope="module")
def operator(kubeconfig, kube):
    """The operator's handlers, registered into their own registry and
    configured as the CLI would (a 1 s timer), run by kopf against the stand-in."""
    registry = kopf.OperatorRegistry()
    register(registry, OperatorConfig(kubeconfig=str(kubeconfig), reconcile_interval=1.0))
    with kopf.testing.KopfRunner(["run", "--all-namespaces", "--standalone"], registry=registry, timeout=60) as runner:
        yield runner


_counter = iter(range(10_000))


def new_ragd(kube: Kube, spec_overrides: dict | None = None, *, namespace: str = "default") -> dict:
    """Create a RAGDeployment with a unique name; return it as stored."""
    from .operator_fixtures import deep_merge

    body = load_example("basic.yaml")
    body["metadata"] = {"name": f"rag{next(_counter)}", "namespace": namespace}
    body["spec"]["retrieval"].pop("corpus", None)  # no ConfigMap needed unless a test asks
    body["spec"] = deep_merge(body["spec"], spec_overrides or {})
    body["spec"].setdefault("interruption", {})["preStopSeconds"] = (
        body["spec"].get("interruption", {}).get("preStopSeconds", 0)
    )
    return kube.create(body)


def engines(kube: Kube, body: dict) -> list[dict]:
    selector = f"{render.LABEL_DEPLOYMENT}={body['metadata']['name']},{render.LABEL_COMPONENT}=engine"
    return kube.list("v1", "Pod", body["metadata"]["namespace"], label_selector=selector)


def serving(pods: list[dict]) -> list[dict]:
    return [
        p
        for p in pods
        if p["metadata"]["labels"].get(render.LABEL_SERVING) == "true" and not p["metadata"].get("deletionTimestamp")
    ]


def play_kubelet(kube: Kube, pods: list[dict], *, ready: bool = True) -> None:
    """Mark pods Running/Ready through the status subresource, as a kubelet does."""
    for pod in pods:
        status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        kube.patch(
            "v1", "Pod", pod["metadata"]["name"], {"status": status}, pod["metadata"]["namespace"], subresource="status"
        )


def ragd(kube: Kube, body: dict) -> dict:
    return kube.get(API_VERSION, KIND, body["metadata"]["name"], body["metadata"]["namespace"])


def diagnose(kube: Kube, body: dict) -> Callable[[], str]:
    def describe() -> str:
        current = ragd(kube, body) or {}
        pods = [
            (p["metadata"]["name"], p["metadata"]["labels"].get(render.LABEL_SERVING), p.get("status", {}).get("phase"))
            for p in engines(kube, body)
        ]
        return f"status={current.get('status')} engines={pods}"

    return describe


def test_create_makes_every_child_with_owner_references_and_status(operator, kube):
    body = new_ragd(kube, {"scaling": {"minReplicas": 3, "onDemandBaseline": 1, "maxReplicas": 4}})
    name, ns, uid = body["metadata"]["name"], "default", body["metadata"]["uid"]
    expected = [
        ("v1", "Service", f"{name}-engines"),
        ("v1", "Service", name),
        ("v1", "ConfigMap", f"{name}-gateway"),
        ("v1", "ServiceAccount", f"{name}-gateway"),
        ("v1", "PersistentVolumeClaim", f"{name}-index"),
        ("apps/v1", "Deployment", f"{name}-gateway"),
        ("policy/v1", "PodDisruptionBudget", f"{name}-gateway"),
        ("rbac.authorization.k8s.io/v1", "Role", f"{name}-gateway"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", f"{name}-gateway"),
    ]
    for api_version, kind, child in expected:
        obj = wait_for(
            lambda: kube.get(api_version, kind, child, ns), what=f"{kind} {child}", diagnose=diagnose(kube, body)
        )
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    pods = wait_for(
        lambda: len(engines(kube, body)) == 3 and engines(kube, body),
        what="3 engine pods",
        diagnose=diagnose(kube, body),
    )
    capacities = sorted(p["metadata"]["labels"][render.LABEL_CAPACITY] for p in pods)
    assert capacities == ["on-demand", "spot", "spot"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in pods)
    status = wait_for(
        lambda: (ragd(kube, body).get("status") or {}).get("engines") == "0/3" and ragd(kube, body)["status"],
        what="status 0/3",
    )
    assert status["spotReplicas"] == 2 and status["onDemandReplicas"] == 1
    assert status["endpoint"] == f"http://{name}.default.svc/v1"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False" and conditions["Degraded"]["status"] == "False"

    play_kubelet(kube, pods)
    wait_for(lambda: ragd(kube, body)["status"]["engines"] == "3/3", what="status 3/3", diagnose=diagnose(kube, body))
    # The operator's own metrics (same process under KopfRunner): 3 ready engines, 3 desired.
    labels = {"namespace": ns, "ragdeployment": name}
    assert prometheus_client.REGISTRY.get_sample_value("spotrag_operator_desired_engines", labels) == 3
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "spotrag_operator_engines", labels | {"capacity": "spot", "state": "ready"}
        )
        == 2
    )
    conditions = {c["type"]: c for c in ragd(kube, body)["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    reasons = wait_for(
        lambda: (
            {e.reason for e in events_of(kube, body)} >= {"Reconciled", "EnginesCreated"}
            and {e.reason for e in events_of(kube, body)}
        ),
        what="Events",
    )
    assert "EnginesCreated" in reasons


def events_of(kube: Kube, body: dict) -> list:
    listed = kubernetes.client.CoreV1Api(kube.api_client).list_namespaced_event(body["metadata"]["namespace"])
    return [e for e in listed.items if e.involved_object.name == body["metadata"]["name"]]


def reconciles(api: KubeAPIServer, body: dict, since: int) -> list[int]:
    """Request ids of the reads that start each reconcile of `body` since `since`:
    observing lists the engine pods exactly once per reconcile, and reconciles
    of one RAGDeployment run one after the other, so the n-th read comes after
    the (n-1)-th reconcile has written all it writes."""
    selector = label_selector(render.engine_selector(body))
    path = f"/api/v1/namespaces/{body['metadata']['namespace']}/pods"
    return [
        r.id
        for r in api.requests(since=since)
        if r.method == "GET" and r.path == path and r.query.get("labelSelector") == selector
    ]


def test_reconcile_is_idempotent(operator, kube, api):
    body = new_ragd(kube)
    pods = wait_for(lambda: engines(kube, body), what="engine pod")
    play_kubelet(kube, pods)
    wait_for(lambda: (ragd(kube, body).get("status") or {}).get("engines") == "1/1", what="1/1 ready")
    # Let one whole reconcile run after 1/1 (any follow-up write lands), then watch three more.
    settled = api.request_count
    mark = wait_for(lambda: reconciles(api, body, settled)[1:2], what="a reconcile after 1/1")[0] - 1
    ends = wait_for(lambda: reconciles(api, body, mark)[3:4], what="three more reconciles")[0]
    writes = [
        r
        for r in api.requests(since=mark)
        if r.id < ends and r.method in ("POST", "PUT", "PATCH", "DELETE") and body["metadata"]["name"] in r.path
    ]
    assert writes == [], [(r.method, r.path) for r in writes]


def test_spec_updates_change_the_right_children(operator, kube):
    body = new_ragd(kube)
    name, ns = body["metadata"]["name"], "default"
    deployment = wait_for(lambda: kube.get("apps/v1", "Deployment", f"{name}-gateway", ns), what="gateway deployment")
    config_hash = deployment["spec"]["template"]["metadata"]["annotations"]["spotrag.io/config-hash"]
    kube.patch(API_VERSION, KIND, name, {"spec": {"gateway": {"replicas": 5}, "retrieval": {"topK": 7}}}, ns)
    wait_for(
        lambda: kube.get("apps/v1", "Deployment", f"{name}-gateway", ns)["spec"]["replicas"] == 5,
        what="gateway replicas 5",
    )
    config = kube.get("v1", "ConfigMap", f"{name}-gateway", ns)
    assert '"topK": 7' in config["data"]["gateway.json"]
    new_hash = kube.get("apps/v1", "Deployment", f"{name}-gateway", ns)["spec"]["template"]["metadata"]["annotations"][
        "spotrag.io/config-hash"
    ]
    assert new_hash != config_hash
    kube.patch(API_VERSION, KIND, name, {"spec": {"gateway": {"serviceType": "LoadBalancer"}}}, ns)
    wait_for(
        lambda: kube.get("v1", "Service", name, ns)["spec"]["type"] == "LoadBalancer",
        what="gateway Service type LoadBalancer",
    )
    kube.patch(API_VERSION, KIND, name, {"spec": {"scaling": {"minReplicas": 2}}}, ns)
    wait_for(lambda: len(serving(engines(kube, body))) == 2, what="a second engine", diagnose=diagnose(kube, body))


def test_gateway_autoscaling_hands_replicas_to_an_hpa_and_back(operator, kube):
    body = new_ragd(kube, {"gateway": {"replicas": 3}})
    name, ns = body["metadata"]["name"], "default"
    wait_for(lambda: kube.get("apps/v1", "Deployment", f"{name}-gateway", ns), what="gateway deployment")
    kube.patch(API_VERSION, KIND, name, {"spec": {"gateway": {"autoscaling": {"maxReplicas": 6}}}}, ns)
    hpa = wait_for(
        lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-gateway", ns), what="the gateway HPA"
    )
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{name}-gateway"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["metadata"]["ownerReferences"][0]["name"] == name
    # What the HPA sets stays: the operator no longer writes replicas.
    kube.patch("apps/v1", "Deployment", f"{name}-gateway", {"spec": {"replicas": 4}}, ns)
    kube.patch(API_VERSION, KIND, name, {"spec": {"retrieval": {"topK": 6}}}, ns)
    wait_for(
        lambda: '"topK": 6' in kube.get("v1", "ConfigMap", f"{name}-gateway", ns)["data"]["gateway.json"],
        what="the config update",
    )
    assert kube.get("apps/v1", "Deployment", f"{name}-gateway", ns)["spec"]["replicas"] == 4
    # Turned off: the HPA goes and the spec's replicas are back.
    kube.patch(API_VERSION, KIND, name, {"spec": {"gateway": {"autoscaling": None}}}, ns)
    wait_for(
        lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", f"{name}-gateway", ns) is None,
        what="the HPA to be deleted",
    )
    wait_for(
        lambda: kube.get("apps/v1", "Deployment", f"{name}-gateway", ns)["spec"]["replicas"] == 3,
        what="the spec's replicas",
    )


def test_engine_spec_change_rolls_new_engines_first(operator, kube, api):
    body = new_ragd(kube, {"scaling": {"minReplicas": 2, "onDemandBaseline": 1}})
    name, ns = body["metadata"]["name"], "default"
    old = wait_for(lambda: len(engines(kube, body)) == 2 and engines(kube, body), what="2 engines")
    play_kubelet(kube, old)
    wait_for(lambda: ragd(kube, body)["status"]["engines"] == "2/2", what="2/2 ready")
    old_names = {p["metadata"]["name"] for p in old}

    kube.patch(API_VERSION, KIND, name, {"spec": {"model": {"maxModelLen": 4096}}}, ns)
    new = wait_for(
        lambda: (
            [p for p in engines(kube, body) if p["metadata"]["name"] not in old_names]
            if len(engines(kube, body)) == 4
            else None
        ),
        what="2 new engines next to the old ones",
        diagnose=diagnose(kube, body),
    )
    assert all("4096" in p["spec"]["containers"][0]["args"] for p in new)
    # Not ready yet: after a whole reconcile that saw them, the old engines keep serving.
    seen = api.request_count
    wait_for(lambda: reconciles(api, body, seen)[1:], what="a reconcile that saw the new engines")
    assert {p["metadata"]["name"] for p in serving(engines(kube, body))} >= old_names
    play_kubelet(kube, new)
    wait_for(
        lambda: not any(p["metadata"]["name"] in old_names for p in engines(kube, body)),
        what="old engines drained and deleted",
        diagnose=diagnose(kube, body),
    )
    assert {p["metadata"]["name"] for p in serving(engines(kube, body))} == {p["metadata"]["name"] for p in new}
    status = ragd(kube, body)["status"]
    assert status["engineSpecHash"] == new[0]["metadata"]["labels"][render.LABEL_SPEC_HASH]


def test_vanished_engine_comes_back(operator, kube):
    body = new_ragd(kube)
    first = wait_for(lambda: engines(kube, body), what="engine")[0]
    kube.delete("v1", "Pod", first["metadata"]["name"], "default")
    replacement = wait_for(
        lambda: [p for p in engines(kube, body) if p["metadata"]["name"] != first["metadata"]["name"]],
        what="a replacement engine",
        diagnose=diagnose(kube, body),
    )
    assert replacement[0]["metadata"]["labels"][render.LABEL_CAPACITY] == "on-demand"


def test_delete_removes_everything(operator, kube):
    body = new_ragd(kube)
    name, ns = body["metadata"]["name"], "default"
    wait_for(lambda: engines(kube, body) and kube.get("apps/v1", "Deployment", f"{name}-gateway", ns), what="children")
    kube.delete(API_VERSION, KIND, name, ns)
    wait_for(lambda: ragd(kube, body) is None, what="the RAGDeployment to go")
    wait_for(lambda: not engines(kube, body), what="engines garbage-collected")
    for api_version, kind, child in [
        ("apps/v1", "Deployment", f"{name}-gateway"),
        ("v1", "Service", name),
        ("v1", "ConfigMap", f"{name}-gateway"),
    ]:
        wait_for(lambda: kube.get(api_version, kind, child, ns) is None, what=f"{kind} {child} garbage-collected")


def test_api_errors_are_retried(operator, kube, api):
    api.inject_faults(method="POST", path_regex=r"/api/v1/namespaces/default/pods$", status=500, times=2)
    api.inject_faults(method="PATCH", path_regex=r"/ragdeployments/[^/]+/status$", status=409, times=1)
    body = new_ragd(kube)
    wait_for(
        lambda: engines(kube, body),
        timeout=40,
        what="an engine despite two failed creates",
        diagnose=diagnose(kube, body),
    )
    wait_for(lambda: (ragd(kube, body).get("status") or {}).get("engines"), timeout=40, what="status despite a 409")


def test_missing_secret_degrades_then_recovers(operator, kube, kubeconfig):
    body = new_ragd(kube, {"gateway": {"apiKeySecret": "handbook-keys-missing"}})
    name = body["metadata"]["name"]

    def degraded() -> dict | None:
        conditions = {c["type"]: c for c in (ragd(kube, body).get("status") or {}).get("conditions") or []}
        return conditions.get("Degraded")

    condition = wait_for(
        lambda: (degraded() or {}).get("status") == "True" and degraded(),
        what="Degraded",
        diagnose=diagnose(kube, body),
    )
    assert "handbook-keys-missing" in condition["message"] and "create it" in condition["message"]
    described = kubectl(kubeconfig, "describe", "ragd", name).stdout
    assert "InvalidConfiguration" in described
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "handbook-keys-missing", "namespace": "default"},
            "stringData": {"key": "sk-1"},
        }
    )
    wait_for(lambda: (degraded() or {}).get("status") == "False", what="Degraded to clear")


def test_gpu_count_no_instance_type_can_hold_degrades(operator, kube):
    body = new_ragd(kube, {"model": {"tensorParallelSize": 4}, "gpu": {"instanceTypes": ["g6.xlarge", "g6.2xlarge"]}})
    wait_for(
        lambda: any(
            c["type"] == "Degraded" and c["status"] == "True" and "g6.xlarge has 1" in c["message"]
            for c in (ragd(kube, body).get("status") or {}).get("conditions") or []
        ),
        what="Degraded naming the instance types",
        diagnose=diagnose(kube, body),
    )


def test_examples_apply_with_kubectl_and_show_printer_columns(operator, kube, kubeconfig):
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "handbook-docs", "namespace": "default"},
            "data": {"a.md": "# A"},
        }
    )
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        result = kubectl(kubeconfig, "apply", "-f", str(example))
        assert "created" in result.stdout or "configured" in result.stdout, result
    table = kubectl(kubeconfig, "get", "ragd").stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "READY", "SPOT", "ON-DEMAND", "QUEUED-TOKENS", "STATUS"] and header[-1] == "AGE"
    wide = kubectl(kubeconfig, "get", "ragd", "handbook", "-o", "wide").stdout
    assert "COST/H" in wide.splitlines()[0] and "Qwen/Qwen2.5-7B-Instruct" in wide
    wait_for(
        lambda: (
            "1/1" in kubectl(kubeconfig, "get", "ragd", "handbook").stdout
            or "0/1" in kubectl(kubeconfig, "get", "ragd", "handbook").stdout
        ),
        what="READY column filled",
    )
    # examples/scale-to-zero.yaml: no engine while idle, and the STATUS column says so.
    wait_for(
        lambda: "ScaledToZero" in kubectl(kubeconfig, "get", "ragd", "after-hours").stdout,
        what="after-hours ScaledToZero",
    )


def test_missing_rbac_permission_degrades_naming_verb_and_resource(operator, kube, api):
    api.inject_faults(
        method="POST", path_regex=r"/apis/policy/v1/namespaces/default/poddisruptionbudgets$", status=403, times=1
    )
    body = new_ragd(kube)

    def degraded() -> dict:
        return next(
            (c for c in (ragd(kube, body).get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), {}
        )

    condition = wait_for(
        lambda: degraded().get("reason") == "Forbidden" and degraded(),
        what="Degraded: Forbidden",
        diagnose=diagnose(kube, body),
    )
    assert "create poddisruptionbudgets (policy) in namespace default" in condition["message"]
    assert {e.reason for e in events_of(kube, body)} >= {"Forbidden"}


def play_job_controller(kube: Kube, job: dict, *, result: dict | None, failed: str | None = None) -> None:
    """What the Job controller and kubelet would do: a pod that ran, its termination message, the Job's status."""
    namespace = job["metadata"]["namespace"]
    name = job["metadata"]["name"]
    pod = kube.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": f"{name}-", "namespace": namespace, "labels": {"job-name": name}},
            "spec": job["spec"]["template"]["spec"],
        }
    )
    terminated = {
        "exitCode": 1 if failed else 0,
        "reason": "Error" if failed else "Completed",
        "message": json.dumps(result) if result else "",
    }
    kube.patch(
        "v1",
        "Pod",
        pod["metadata"]["name"],
        {
            "status": {
                "phase": "Failed" if failed else "Succeeded",
                "containerStatuses": [
                    {
                        "name": "index",
                        "ready": False,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
        namespace,
        subresource="status",
    )
    status = (
        {
            "failed": 5,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": failed}],
        }
        if failed
        else {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    )
    kube.patch("batch/v1", "Job", name, {"status": status}, namespace, subresource="status")


def index_condition(kube: Kube, body: dict) -> dict:
    return next(
        (c for c in (ragd(kube, body).get("status") or {}).get("conditions") or [] if c["type"] == "IndexReady"), {}
    )


def test_index_job_runs_for_the_corpus_and_is_tracked(operator, kube):
    docs = kube.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"generateName": "docs-", "namespace": "default"},
            "data": {"ferry.md": "# Ferries\nThe 7:40 ferry leaves from pier 3."},
        }
    )
    body = new_ragd(kube, {"retrieval": {"corpus": {"configMap": docs["metadata"]["name"]}}})
    name = body["metadata"]["name"]

    def jobs():
        return kube.list(
            "batch/v1", "Job", "default", label_selector=f"spotrag.io/deployment={name},spotrag.io/component=index"
        )

    first = wait_for(lambda: jobs(), what="the index Job", diagnose=diagnose(kube, body))[0]
    assert first["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["spotrag", "index", "build"]
    wait_for(lambda: index_condition(kube, body).get("reason") == "Building", what="IndexReady Building")

    play_job_controller(kube, first, result={"ok": True, "version": "20261122-ab12", "count": 42})
    wait_for(
        lambda: index_condition(kube, body).get("status") == "True",
        what="IndexReady True",
        diagnose=diagnose(kube, body),
    )
    assert ragd(kube, body)["status"]["index"]["version"] == "20261122-ab12"
    assert ragd(kube, body)["status"]["index"]["passages"] == 42

    # New documents: a new Job; the old one goes once the new one succeeded.
    kube.patch(
        "v1",
        "ConfigMap",
        docs["metadata"]["name"],
        {"data": {"ferry.md": "# Ferries\nThe 7:40 ferry now leaves from pier 4."}},
        "default",
    )
    second = wait_for(
        lambda: [j for j in jobs() if j["metadata"]["name"] != first["metadata"]["name"]], what="a second index Job"
    )[0]
    play_job_controller(kube, second, result=None, failed="the corpus could not be read")
    condition = wait_for(
        lambda: index_condition(kube, body).get("reason") == "IndexJobFailed" and index_condition(kube, body),
        what="IndexJobFailed",
    )
    assert (
        "the corpus could not be read" in condition["message"]
        and f"kubectl logs job/{second['metadata']['name']}" in condition["message"]
    )
    assert {j["metadata"]["name"] for j in jobs()} == {
        first["metadata"]["name"],
        second["metadata"]["name"],
    }  # the last good one stays
