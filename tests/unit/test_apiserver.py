"""The Kubernetes API stand-in, exercised by the real clients that rely on it:
the ``kubernetes`` client over HTTP, raw HTTP where the wire format matters,
the real kubectl binary, and a small real kopf operator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import kopf
import kopf.testing
import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException

from spotrag_box.apiserver.server import KubeAPIServer, cli
from spotrag_box.testing import eventually, helm, kubectl, running_kube_api

GROUP, VERSION, PLURAL = "example.test", "v1", "widgets"
WIDGET_CRD = yaml.safe_load(
    textwrap.dedent("""
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata: {name: widgets.example.test}
    spec:
      group: example.test
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
      versions:
      - name: v1
        served: true
        storage: true
        subresources:
          status: {}
          scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
        additionalPrinterColumns:
        - {name: Size, type: string, jsonPath: .spec.size}
        - {name: Replicas, type: integer, jsonPath: .spec.replicas}
        - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
        schema:
          openAPIV3Schema:
            type: object
            properties:
              spec:
                type: object
                required: [size]
                properties:
                  size: {type: string, enum: [small, large]}
                  replicas: {type: integer, minimum: 0, default: 1}
              status:
                type: object
                x-kubernetes-preserve-unknown-fields: true
""")
)


def widget(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": "small", **spec},
    }


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}], **spec},
    }


@pytest.fixture
def api():
    with running_kube_api() as server:
        server.apply(WIDGET_CRD)
        yield server


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def client(kubeconfig):
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    with kubernetes.client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def core(client):
    return kubernetes.client.CoreV1Api(client)


@pytest.fixture
def custom(client):
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture
def http(api):
    with httpx.Client(base_url=api.url, timeout=10) as http_client:
        yield http_client


def create_widget(custom, name: str = "demo", **spec: Any) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget(name, **spec))


def get_widget(custom, name: str = "demo") -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)


# --- objects: metadata, patches, conflicts ---------------------------------------------------------------


def test_create_sets_server_metadata_and_answers_201(http):
    response = http.post("/apis/example.test/v1/namespaces/default/widgets", json=widget())
    assert response.status_code == 201
    metadata = response.json()["metadata"]
    assert metadata["namespace"] == "default"  # from the URL
    assert metadata["generation"] == 1
    assert len(metadata["uid"]) == 36 and metadata["creationTimestamp"].endswith("Z")
    second = http.post("/apis/example.test/v1/namespaces/default/widgets", json=widget("other")).json()
    assert int(second["metadata"]["resourceVersion"]) > int(metadata["resourceVersion"])


def test_generation_counts_spec_changes_only(custom):
    created = create_widget(custom)
    labelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "demo", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    statused = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "demo", {"status": {"phase": "Ready"}}
    )
    assert statused["metadata"]["generation"] == 1
    respecced = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "demo", {"spec": {"size": "large"}}
    )
    assert respecced["metadata"]["generation"] == 2
    versions = [int(o["metadata"]["resourceVersion"]) for o in (created, labelled, statused, respecced)]
    assert versions == sorted(set(versions))


def test_a_write_that_changes_nothing_keeps_the_resource_version(custom):
    created = create_widget(custom)
    again = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "demo", {"spec": {"size": "small"}}
    )
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_duplicate_name_is_409_already_exists(custom):
    create_widget(custom)
    with pytest.raises(ApiException) as error:
        create_widget(custom)
    assert error.value.status == 409
    assert json.loads(error.value.body)["reason"] == "AlreadyExists"


def test_missing_object_is_a_404_status(http):
    response = http.get("/api/v1/namespaces/default/pods/ghost")
    assert response.status_code == 404
    assert response.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "code": 404,
        "reason": "NotFound",
        "message": 'pods "ghost" not found',
        "details": {"name": "ghost", "group": "", "kind": "pods"},
    }


def test_generate_name_gives_distinct_names(core):
    event = {
        "metadata": {"generateName": "demo."},
        "involvedObject": {"kind": "Pod", "name": "x"},
        "reason": "Tested",
        "message": "hello",
        "type": "Normal",
    }
    names = {core.create_namespaced_event("default", event).metadata.name for _ in range(3)}
    assert len(names) == 3 and all(name.startswith("demo.") for name in names)


def test_creating_in_a_missing_namespace_is_404(core):
    with pytest.raises(ApiException) as error:
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert error.value.status == 404
    assert json.loads(error.value.body)["message"] == 'namespaces "nowhere" not found'


def test_kopf_finalizer_json_patch_with_resource_version_test(custom, http):
    created = create_widget(custom)
    url = "/apis/example.test/v1/namespaces/default/widgets/demo"
    patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.test/kopf"]},
    ]
    headers = {"Content-Type": "application/json-patch+json"}
    applied = http.patch(url, content=json.dumps(patch), headers=headers)
    assert applied.status_code == 200
    assert applied.json()["metadata"]["finalizers"] == ["example.test/kopf"]
    stale = http.patch(url, content=json.dumps(patch), headers=headers)
    assert stale.status_code == 422  # what kopf reads as "changed meanwhile, retry on the next event"


def test_strategic_merge_patch_merges_containers_by_name(client):
    apps = kubernetes.client.AppsV1Api(client)
    template = {
        "metadata": {"labels": {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}]},
                {"name": "sidecar", "image": "busybox:1"},
            ]
        },
    }
    apps.create_namespaced_deployment(
        "default",
        {
            "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": template},
        },
    )
    patched = apps.patch_namespaced_deployment(
        "web", "default", {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "busybox:2"}]}}}}
    )
    containers = patched.spec.template.spec.containers
    assert [(c.name, c.image) for c in containers] == [("web", "nginx:1"), ("sidecar", "busybox:2")]
    assert containers[0].ports[0].container_port == 80


def test_server_side_apply_creates_then_merges_and_needs_a_field_manager(http):
    url = "/apis/example.test/v1/namespaces/default/widgets/demo"
    headers = {"Content-Type": "application/apply-patch+yaml"}
    body = yaml.safe_dump(widget())
    created = http.patch(url, params={"fieldManager": "test"}, content=body, headers=headers)
    assert created.status_code == 201
    updated = http.patch(
        url, params={"fieldManager": "test"}, content=yaml.safe_dump(widget(replicas=3)), headers=headers
    )
    assert updated.json()["spec"] == {"size": "small", "replicas": 3}
    assert http.patch(url, content=body, headers=headers).status_code == 400


def test_strategic_merge_patch_of_a_custom_resource_is_415(http, custom):
    create_widget(custom)
    response = http.patch(
        "/apis/example.test/v1/namespaces/default/widgets/demo",
        json={"spec": {"replicas": 2}},
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert response.status_code == 415


def test_put_replaces_and_refuses_a_stale_resource_version(custom):
    created = create_widget(custom, replicas=3)
    replaced = custom.replace_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "demo",
        {
            **widget(size="large"),
            "metadata": {"name": "demo", "resourceVersion": created["metadata"]["resourceVersion"]},
        },
    )
    assert replaced["spec"] == {"size": "large", "replicas": 1}  # replaced, then defaulted
    with pytest.raises(ApiException) as error:
        custom.replace_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "demo",
            {**widget(), "metadata": {"name": "demo", "resourceVersion": created["metadata"]["resourceVersion"]}},
        )
    assert error.value.status == 409


def test_status_subresource_is_separate_from_the_main_resource(custom):
    create_widget(custom)
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo", {"status": {"phase": "Hacked"}})
    assert "status" not in get_widget(custom)
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "demo", {"status": {"phase": "Ready"}, "spec": {"size": "large"}}
    )
    stored = get_widget(custom)
    assert stored["status"] == {"phase": "Ready"} and stored["spec"]["size"] == "small"


# --- deletion: finalizers, graceful pods, garbage collection, namespaces ---------------------------------


def test_finalizers_hold_the_object_until_removed(custom):
    create_widget(custom)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "demo", {"metadata": {"finalizers": ["example.test/hold"]}}
    )
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    held = get_widget(custom)
    assert held["metadata"]["deletionTimestamp"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as error:
        get_widget(custom)
    assert error.value.status == 404


def test_deleting_an_owner_collects_its_dependents_in_cascade(core, custom):
    owner = create_widget(custom)

    def owned_by(obj: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"],
            }
        ]

    child = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "child", "ownerReferences": owned_by(owner)}}
    )
    child_dict = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "uid": child.metadata.uid}}
    core.create_namespaced_secret(
        "default", {"metadata": {"name": "grandchild", "ownerReferences": owned_by(child_dict)}}
    )
    core.create_namespaced_config_map("default", {"metadata": {"name": "bystander"}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    eventually(
        lambda: [c.metadata.name for c in core.list_namespaced_config_map("default").items] == ["bystander"],
        what="the child to be collected",
    )
    eventually(lambda: not core.list_namespaced_secret("default").items, what="the grandchild to be collected")


def test_orphan_propagation_keeps_dependents_and_drops_the_reference(core, custom):
    owner = create_widget(custom)
    reference = {"apiVersion": owner["apiVersion"], "kind": "Widget", "name": "demo", "uid": owner["metadata"]["uid"]}
    core.create_namespaced_config_map("default", {"metadata": {"name": "child", "ownerReferences": [reference]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo", propagation_policy="Orphan")
    assert core.read_namespaced_config_map("child", "default").metadata.owner_references is None


def test_pods_on_a_node_terminate_gracefully_until_their_kubelet_deletes_them(core):
    core.create_namespaced_pod("default", pod("unscheduled"))
    core.create_namespaced_pod("default", pod("running", nodeName="node-1", terminationGracePeriodSeconds=20))
    core.delete_namespaced_pod("unscheduled", "default")
    core.delete_namespaced_pod("running", "default")
    terminating = core.read_namespaced_pod("running", "default")
    assert terminating.metadata.deletion_grace_period_seconds == 20
    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["running"]
    core.delete_namespaced_pod("running", "default", grace_period_seconds=0)  # the kubelet's final word
    assert core.list_namespaced_pod("default").items == []


def test_eviction_respects_a_pod_disruption_budget(client, core):
    policy = kubernetes.client.PolicyV1Api(client)
    policy.create_namespaced_pod_disruption_budget(
        "default",
        {"metadata": {"name": "engines"}, "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "engine"}}}},
    )
    for name in ("engine-a", "engine-b"):
        core.create_namespaced_pod("default", pod(name, {"app": "engine"}))
        core.patch_namespaced_pod_status(
            name, "default", {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
        )
    eviction = {"metadata": {"name": "engine-a", "namespace": "default"}}
    core.create_namespaced_pod_eviction("engine-a", "default", eviction)
    with pytest.raises(ApiException) as error:
        core.create_namespaced_pod_eviction("engine-b", "default", {**eviction, "metadata": {"name": "engine-b"}})
    assert error.value.status == 429
    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["engine-b"]


def test_deleting_a_namespace_deletes_its_content(core):
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", {"metadata": {"name": "x"}})
    core.delete_namespace("doomed")
    eventually(
        lambda: "doomed" not in [n.metadata.name for n in core.list_namespace().items], what="the namespace to go"
    )
    assert core.list_config_map_for_all_namespaces(field_selector="metadata.namespace=doomed").items == []


# --- lists and watches -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=engine", ["a", "b"]),
        ("app==engine,tier=gpu", ["a"]),
        ("tier!=gpu", ["b", "c"]),
        ("tier in (gpu,cpu)", ["a", "b"]),
        ("tier notin (gpu)", ["b", "c"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c"]),
    ],
)
def test_label_selectors(core, selector, expected):
    core.create_namespaced_pod("default", pod("a", {"app": "engine", "tier": "gpu"}))
    core.create_namespaced_pod("default", pod("b", {"app": "engine", "tier": "cpu"}))
    core.create_namespaced_pod("default", pod("c", {"app": "gateway"}))
    assert [p.metadata.name for p in core.list_namespaced_pod("default", label_selector=selector).items] == expected


def test_crd_selectable_fields(api, custom):
    crd = json.loads(json.dumps(WIDGET_CRD))
    crd["spec"]["versions"][0]["selectableFields"] = [{"jsonPath": ".spec.size"}]
    api.apply(crd)
    create_widget(custom, "tiny")
    create_widget(custom, "huge", size="large")
    selected = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, field_selector="spec.size=large")
    assert [w["metadata"]["name"] for w in selected["items"]] == ["huge"]


def test_field_selectors_and_list_kind(core, http):
    core.create_namespaced_pod("default", pod("a", nodeName="node-1"))
    core.create_namespaced_pod("default", pod("b"))
    core.patch_namespaced_pod_status("a", "default", {"status": {"phase": "Running"}})
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1").items] == [
        "a"
    ]
    assert [
        p.metadata.name for p in core.list_namespaced_pod("default", field_selector="status.phase!=Running").items
    ] == ["b"]
    assert [p.metadata.name for p in core.list_namespaced_pod("default", field_selector="metadata.name=b").items] == [
        "b"
    ]
    listed = http.get("/api/v1/namespaces/default/pods").json()
    assert listed["kind"] == "PodList" and listed["apiVersion"] == "v1"
    refused = http.get("/api/v1/pods", params={"fieldSelector": "spec.favouriteColour=blue"})
    assert refused.status_code == 400


def watch_events(http: httpx.Client, url: str, count: int, **params: str) -> tuple[str, list[dict[str, Any]]]:
    """The first ``count`` events of a watch (then hang up), and the response's content type."""
    events: list[dict[str, Any]] = []
    with http.stream("GET", url, params={"watch": "true", **params}) as response:
        for line in response.iter_lines():
            if line:
                events.append(json.loads(line))
            if len(events) == count:
                break
        return response.headers["content-type"], events


def test_watch_from_a_resource_version_sends_only_later_events(core, http):
    core.create_namespaced_pod("default", pod("before"))
    since = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("after"))
    core.patch_namespaced_pod("before", "default", {"metadata": {"labels": {"x": "y"}}})
    content_type, events = watch_events(http, "/api/v1/namespaces/default/pods", 2, resourceVersion=since)
    assert content_type.startswith("application/json")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"),
        ("MODIFIED", "before"),
    ]


def test_watch_without_resource_version_starts_with_the_current_state(core, http):
    core.create_namespaced_pod("default", pod("existing"))
    _, events = watch_events(http, "/api/v1/namespaces/default/pods", 1, watch="True")  # kubernetes_asyncio's spelling
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "existing")]


def test_streaming_list_ends_its_initial_events_with_a_bookmark(core, http):
    core.create_namespaced_pod("default", pod("existing"))
    _, events = watch_events(
        http,
        "/api/v1/namespaces/default/pods",
        2,
        sendInitialEvents="true",
        resourceVersionMatch="NotOlderThan",
        allowWatchBookmarks="true",
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_with_a_selector_sees_an_object_leave_as_deleted(core, http):
    core.create_namespaced_pod("default", pod("engine", {"spotrag.io/serving": "true"}))
    since = core.list_namespaced_pod("default").metadata.resource_version
    core.patch_namespaced_pod("engine", "default", {"metadata": {"labels": {"spotrag.io/serving": "false"}}})
    _, events = watch_events(
        http, "/api/v1/namespaces/default/pods", 1, resourceVersion=since, labelSelector="spotrag.io/serving=true"
    )
    assert [(e["type"], e["object"]["metadata"]["labels"]) for e in events] == [
        ("DELETED", {"spotrag.io/serving": "false"})
    ]


def test_watch_timeout_seconds_ends_the_stream(core):
    watch = kubernetes.watch.Watch()
    events = list(watch.stream(core.list_namespaced_pod, "default", timeout_seconds=1))
    assert events == []  # and the stream ended by itself


def test_watch_from_a_forgotten_resource_version_is_410(api, http):
    # The server remembers a bounded window of changes, as etcd compacts: shrink it to one.
    api.call(lambda emulator: setattr(emulator.store, "change_log_size", 1))
    for name in ("a", "b", "c"):
        http.post("/api/v1/namespaces/default/configmaps", json={"metadata": {"name": name}})
    _, events = watch_events(http, "/api/v1/namespaces/default/configmaps", 1, resourceVersion="2")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


# --- discovery, scale, tables, faults, the request log -------------------------------------------------------


def test_discovery_names_core_kinds_and_custom_resources(http, api):
    core_list = http.get("/api/v1").json()
    assert core_list["groupVersion"] == "v1"
    kinds = {r["name"]: r["kind"] for r in core_list["resources"]}
    assert kinds["pods"] == "Pod" and kinds["pods/status"] == "Pod" and kinds["namespaces"] == "Namespace"
    groups = {g["name"] for g in http.get("/apis").json()["groups"]}
    assert {
        "apps",
        "discovery.k8s.io",
        "policy",
        "batch",
        "events.k8s.io",
        "coordination.k8s.io",
        "rbac.authorization.k8s.io",
        "kopf.dev",
        "example.test",
    } <= groups
    widgets = next(r for r in http.get("/apis/example.test/v1").json()["resources"] if r["name"] == "widgets")
    assert widgets["shortNames"] == ["wdg"] and widgets["namespaced"] is True
    assert http.get("/version").json()["gitVersion"] == "v1.36.0"
    api.version = "v1.31.4"
    assert http.get("/version").json()["minor"] == "31"


def test_scale_subresource_of_a_deployment(client):
    apps = kubernetes.client.AppsV1Api(client)
    apps.create_namespaced_deployment(
        "default",
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "i"}]},
                },
            },
        },
    )
    scale = apps.patch_namespaced_deployment_scale("web", "default", {"spec": {"replicas": 4}})
    assert scale.kind == "Scale" and scale.spec.replicas == 4 and scale.status.selector == "app=web"
    assert apps.read_namespaced_deployment("web", "default").spec.replicas == 4


def test_table_of_custom_resources_uses_the_printer_columns(custom, http):
    create_widget(custom, replicas=2)
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "demo", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    table = http.get(
        "/apis/example.test/v1/namespaces/default/widgets",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"},
    ).json()
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Replicas", "Ready", "Age"]
    assert table["rows"][0]["cells"][:4] == ["demo", "small", 2, "True"]


def test_injected_faults_answer_then_clear(api, core):
    api.inject_faults(method="POST", path_regex=r"/configmaps$", status=500, times=2)
    mark = api.request_count
    outcomes = []
    for _ in range(3):
        try:
            core.create_namespaced_config_map("default", {"metadata": {"name": "x"}})
            outcomes.append("created")
        except ApiException as e:
            outcomes.append(e.status)
    assert outcomes == [500, 500, "created"]
    assert [(r.method, r.status) for r in api.requests(since=mark)] == [("POST", 500), ("POST", 500), ("POST", 201)]


def test_injected_429_carries_retry_after(api, http):
    api.inject_faults(method="*", path_regex=r"/pods", status=429)
    response = http.get("/api/v1/namespaces/default/pods")
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.json()["reason"] == "TooManyRequests"


def test_request_log_is_bounded_and_keeps_ids():
    with KubeAPIServer(request_log_size=3) as server, httpx.Client(base_url=server.url) as http_client:
        for _ in range(5):
            http_client.get("/api/v1/namespaces", params={"limit": "1"})
        recorded = server.requests()
    assert [r.id for r in recorded] == [3, 4, 5]
    assert recorded[-1].path == "/api/v1/namespaces" and recorded[-1].query == {"limit": "1"}


def test_paginated_list(core):
    for name in ("a", "b", "c"):
        core.create_namespaced_config_map("default", {"metadata": {"name": name}})
    first = core.list_namespaced_config_map("default", limit=2)
    rest = core.list_namespaced_config_map("default", limit=2, _continue=first.metadata._continue)
    assert [c.metadata.name for c in first.items + rest.items] == ["a", "b", "c"]
    assert rest.metadata._continue is None


# --- the real kubectl ------------------------------------------------------------------------------------


def test_kubectl_round_trip_on_a_custom_resource(kubeconfig, tmp_path, api):
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget(replicas=2)))
    assert "widget.example.test/demo created" in kubectl(kubeconfig, "apply", "-f", str(manifest)).stdout
    table = kubectl(kubeconfig, "get", "wdg").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "REPLICAS", "READY", "AGE"]
    assert table[1].split()[:3] == ["demo", "small", "2"]
    as_yaml = yaml.safe_load(kubectl(kubeconfig, "get", "widget", "demo", "-o", "yaml").stdout)
    assert as_yaml["spec"] == {"size": "small", "replicas": 2}
    assert "Size:      small" in kubectl(kubeconfig, "describe", "widget", "demo").stdout
    kubectl(kubeconfig, "patch", "widget", "demo", "--type=merge", "-p", '{"spec":{"size":"large"}}')
    kubectl(kubeconfig, "scale", "widget", "demo", "--replicas=5")
    replacement = tmp_path / "replacement.yaml"
    replacement.write_text(yaml.safe_dump({**widget(replicas=7), "spec": {"size": "large", "replicas": 7}}))
    kubectl(kubeconfig, "replace", "-f", str(replacement))
    kubectl(kubeconfig, "wait", "--for=jsonpath={.spec.replicas}=7", "widget/demo", "--timeout=10s")
    api.call(
        lambda emulator: emulator.writes.patch(
            emulator.registry.lookup(GROUP, VERSION, PLURAL),
            "default",
            "demo",
            "application/merge-patch+json",
            {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            subresource="status",
        )
    )
    kubectl(kubeconfig, "wait", "--for=condition=Ready", "widget/demo", "--timeout=10s")
    assert "serverside-applied" in kubectl(kubeconfig, "apply", "--server-side", "-f", str(manifest)).stdout
    kubectl(kubeconfig, "delete", "widget", "demo", "--timeout=10s")
    assert "No resources found" in kubectl(kubeconfig, "get", "widgets").stderr


def test_kubectl_reports_admission_errors_by_field(kubeconfig):
    result = kubectl(
        kubeconfig, "apply", "-f", "-", check=False, input=yaml.safe_dump(widget(size="huge", replicas=-1))
    )
    assert result.returncode != 0
    assert 'spec.size: Unsupported value: "huge": supported values: "small", "large"' in result.stderr
    assert (
        "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0" in result.stderr
    )


def test_kubectl_on_built_in_kinds(kubeconfig, tmp_path):
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]},
                        {"name": "sidecar", "image": "busybox"},
                    ]
                },
            },
        },
    }
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    kubectl(kubeconfig, "apply", "-f", str(manifest))
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:2"
    manifest.write_text(yaml.safe_dump(deployment))
    assert "configured" in kubectl(kubeconfig, "apply", "-f", str(manifest)).stdout
    kubectl(kubeconfig, "scale", "deployment", "web", "--replicas=3")
    images = kubectl(
        kubeconfig, "get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[*].image}"
    ).stdout
    assert images == "3 nginx:2 busybox"
    assert kubectl(kubeconfig, "get", "namespaces", "-o", "name").stdout.split() == [
        "namespace/default",
        "namespace/kube-node-lease",
        "namespace/kube-public",
        "namespace/kube-system",
    ]


def test_kubectl_validates_fields_strictly_as_against_a_real_cluster(kubeconfig, tmp_path):
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(yaml.safe_dump(widget(replcias=2)))
    refused = kubectl(kubeconfig, "apply", "-f", str(manifest), check=False)
    assert refused.returncode != 0 and 'strict decoding error: unknown field "spec.replcias"' in refused.stderr
    assert "created" in kubectl(kubeconfig, "apply", "-f", str(manifest), validate=False).stdout


def test_helm_installs_upgrades_and_uninstalls_a_chart(kubeconfig, tmp_path, core):
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "templates" / "config.yaml").write_text(
        textwrap.dedent("""
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: '{{ .Release.Name }}-config'}
        data: {size: '{{ .Values.size }}'}
        ---
        apiVersion: example.test/v1
        kind: Widget
        metadata: {name: '{{ .Release.Name }}'}
        spec: {size: '{{ .Values.size }}'}
    """)
    )
    (chart / "values.yaml").write_text("size: small\n")
    helm(kubeconfig, "install", "demo", str(chart))
    helm(kubeconfig, "upgrade", "demo", str(chart), "--set", "size=large")
    releases = json.loads(helm(kubeconfig, "list", "-o", "json").stdout)
    assert [(r["name"], r["revision"], r["status"]) for r in releases] == [("demo", "2", "deployed")]
    assert core.read_namespaced_config_map("demo-config", "default").data == {"size": "large"}
    helm(kubeconfig, "uninstall", "demo")
    assert core.list_namespaced_config_map("default").items == []
    assert core.list_namespaced_secret("default", label_selector="owner=helm").items == []


# --- a real kopf operator --------------------------------------------------------------------------------


def test_kopf_operator_with_finalizers_status_and_children(api, client, custom, core):
    registry = kopf.OperatorRegistry()
    deleted: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=api.url, token="test", default_namespace="default")

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = "example.test/finalizer"
        settings.watching.server_timeout = 30

    @kopf.on.create(GROUP, VERSION, PLURAL, id="create_child", registry=registry)
    def create_child(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, **_: Any) -> dict[str, str]:
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config"},
            "data": {"size": spec["size"]},
        }
        kopf.adopt(child, owner=body)
        kubernetes.client.CoreV1Api(client).create_namespaced_config_map(namespace, child)
        kopf.info(body, reason="ChildCreated", message=f"created {child['metadata']['name']}")
        return {"child": child["metadata"]["name"]}

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="remember_deletion", registry=registry)
    def remember_deletion(name: str, **_: Any) -> None:
        deleted.append(name)

    with kopf.testing.KopfRunner(["run", "--standalone", "--namespace=default"], registry=registry, timeout=30):
        create_widget(custom)
        handled = eventually(
            lambda: get_widget(custom).get("status", {}).get("create_child"), what="the create handler"
        )
        assert handled == {"child": "demo-config"}
        assert get_widget(custom)["metadata"]["finalizers"] == ["example.test/finalizer"]
        owner_uid = get_widget(custom)["metadata"]["uid"]
        assert core.read_namespaced_config_map("demo-config", "default").metadata.owner_references[0].uid == owner_uid
        posted = eventually(
            lambda: core.list_namespaced_event("default", field_selector=f"involvedObject.uid={owner_uid}").items,
            what="kopf's events about the widget",
        )
        assert [(event.reason, event.message) for event in posted] == [("ChildCreated", "created demo-config")]
        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
        eventually(
            lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"],
            what="the widget to go once its delete handler ran",
        )
        eventually(lambda: not core.list_namespaced_config_map("default").items, what="the child to be collected")
    assert deleted == ["demo"]


# --- spotrag api-server ------------------------------------------------------------------------------------


def test_api_server_command_serves_until_terminated(tmp_path):
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    kubeconfig = tmp_path / "kubeconfig"
    command = [
        sys.executable,
        "-c",
        "import sys; from spotrag_box.apiserver.server import cli; sys.exit(cli(sys.argv[1:]))",
        "--port",
        "0",
        "--kubeconfig-out",
        str(kubeconfig),
        "--crd",
        str(crd_file),
        "--version",
        "v1.35.2",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    ) as server:
        try:
            banner = server.stdout.readline()
            assert "listening on http://127.0.0.1:" in banner
            assert "widgets.example.test" in kubectl(kubeconfig, "get", "crd", "-o", "name").stdout
            assert "v1.35.2" in kubectl(kubeconfig, "version", "-o", "json").stdout
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
    assert server.returncode == 0


def test_api_server_command_refuses_a_bad_crd_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed")
    assert cli(["--crd", str(broken)]) == 1
    assert "cannot apply" in capsys.readouterr().err
