"""The chart's front door (off by default): what it renders, the rights it
holds, and that the program accepts the config and flags the chart gives it.
The scenarios of test_chart.py render it too (strict validation, the
restricted PodSecurity level, no RBAC wildcards)."""

from __future__ import annotations

import json

import pytest

from spotrag_runtime.frontdoor.cli import build_parser, config_from_args
from spotrag_runtime.frontdoor.config import FrontDoorConfig

from .test_chart import EVERY_FEATURE_CLUSTER_WIDE, EVERY_FEATURE_NAMESPACED, find, helm, only, template  # noqa: F401

NAME = "spotrag-front-door"


@pytest.fixture(scope="module")
def namespaced(helm):  # noqa: F811
    return template(helm, EVERY_FEATURE_NAMESPACED)


@pytest.fixture(scope="module")
def cluster_wide(helm):  # noqa: F811
    return template(helm, EVERY_FEATURE_CLUSTER_WIDE)


def _rules(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_off_by_default(helm) -> None:  # noqa: F811
    objects = template(helm, {})
    assert not [o for o in objects if o["metadata"]["name"].endswith("front-door")]


def test_rights_are_read_routes_and_write_only_their_status(namespaced, cluster_wide) -> None:
    read = {("spotrag.io", r, v) for r in ("ragdeployments", "modelroutes") for v in ("get", "list", "watch")}
    status = {("spotrag.io", "modelroutes/status", v) for v in ("get", "patch")}
    slices = {("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
    roles = find(namespaced, "Role", NAME)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(_rules(role) == read | status | slices for role in roles)
    assert not find(namespaced, "ClusterRole", NAME)
    assert _rules(only(cluster_wide, "ClusterRole", NAME)) == read | status  # address: service
    binding = only(cluster_wide, "ClusterRoleBinding", NAME)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": "spotrag"}]


def test_the_program_accepts_the_config_and_flags_the_chart_renders(namespaced, tmp_path) -> None:
    config_map = only(namespaced, "ConfigMap", NAME)
    path = tmp_path / "frontdoor.json"
    path.write_text(config_map["data"]["frontdoor.json"])
    deployment = only(namespaced, "Deployment", NAME)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["spotrag"] and container["args"][0] == "front-door"
    args = [arg.replace("/etc/spotrag/frontdoor.json", str(path)) for arg in container["args"][1:]]
    config = config_from_args(build_parser().parse_args(args))
    assert config == FrontDoorConfig(
        namespaces=("team-a", "team-b"),
        address="endpointslices",
        api_keys_dir="/etc/spotrag/api-keys",
        models_by_key={"team-a": ("chat",)},
    )
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/spotrag/api-keys"] == "api-keys"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "front-door-keys"
    assert json.loads(config_map["data"]["frontdoor.json"])["gatewayPort"] == 80


def test_service_pdb_and_spread(namespaced, cluster_wide) -> None:
    service = only(namespaced, "Service", NAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    deployment = only(cluster_wide, "Deployment", NAME)
    assert deployment["spec"]["replicas"] == 3
    assert only(cluster_wide, "PodDisruptionBudget", NAME)["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_pod_monitor_scrapes_the_front_door_pods(namespaced, cluster_wide) -> None:
    monitor = only(namespaced, "PodMonitor", NAME)
    deployment = only(namespaced, "Deployment", NAME)
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # monitoring.labels
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics") and ports[0]["name"] == "http"
    assert not find(cluster_wide, "PodMonitor", NAME)
