"""Admission of custom resources against their CRD: defaulting, pruning,
schema validation and CEL rules, worded as kube-apiserver words them."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest

from spotrag_box.apiserver.crd_admission import FieldError, check_crd, invalid_message, validate_custom_resource
from spotrag_box.testing import running_kube_api

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["model"],
            "x-kubernetes-validations": [
                {
                    "rule": "self.scaling.minReplicas <= self.scaling.maxReplicas",
                    "message": "minReplicas must not exceed maxReplicas",
                    "fieldPath": ".scaling.minReplicas",
                },
            ],
            "properties": {
                "model": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 20, "pattern": "^[a-z0-9/-]*$"},
                        "dtype": {"type": "string", "enum": ["auto", "float16", "bfloat16"], "default": "auto"},
                        "gpuMemoryUtilization": {
                            "type": "number",
                            "minimum": 0.1,
                            "maximum": 1,
                            "exclusiveMinimum": False,
                        },
                    },
                },
                "scaling": {
                    "type": "object",
                    "default": {},
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0, "default": 1},
                        "maxReplicas": {"type": "integer", "minimum": 1, "maximum": 64, "default": 4},
                        "target": {"x-kubernetes-int-or-string": True, "default": "80%"},
                    },
                },
                "zones": {
                    "type": "array",
                    "maxItems": 2,
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string"},
                },
                "routes": {
                    "type": "array",
                    "x-kubernetes-validations": [
                        {"rule": "self.all(r, r.weight > 0)", "message": "weights must be positive"},
                        {
                            "rule": "self.exists_one(r, r.primary)",
                            "messageExpression": "'exactly one primary route, found ' + string(size(self.filter(r, r.primary)))",
                        },
                    ],
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "weight": {"type": "integer", "default": 1},
                            "primary": {"type": "boolean", "default": False},
                        },
                    },
                },
                "storageClass": {
                    "type": "string",
                    "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "storageClass is immutable"}],
                },
                "owner": {"type": "string", "nullable": True},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 5}},
                "gateway": {
                    "type": "object",
                    "x-kubernetes-validations": [
                        {
                            "rule": "!has(self.tls) || self.port == 443",
                            "message": "TLS needs port 443",
                            "reason": "FieldValueForbidden",
                        },
                    ],
                    "properties": {"port": {"type": "integer", "default": 80}, "tls": {"type": "boolean"}},
                },
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "ragtests.example.test"},
    "spec": {
        "group": "example.test",
        "scope": "Namespaced",
        "names": {"plural": "ragtests", "singular": "ragtest", "kind": "RagTest"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": SCHEMA},
            }
        ],
    },
}


def resource(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.test/v1",
        "kind": "RagTest",
        "metadata": {"name": "demo"},
        "spec": {"model": {"name": "qwen"}, **spec},
    }


def errors_of(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    _, errors = validate_custom_resource(CRD, obj, old)
    return [str(error) for error in errors]


def test_a_valid_object_passes_and_gets_its_defaults_including_nested_ones():
    admitted, errors = validate_custom_resource(CRD, resource(routes=[{"name": "a", "primary": True}]))
    assert errors == []
    assert admitted["spec"] == {
        "model": {"name": "qwen", "dtype": "auto"},
        "scaling": {"minReplicas": 1, "maxReplicas": 4, "target": "80%"},  # defaulted {} got its own defaults
        "routes": [{"name": "a", "weight": 1, "primary": True}],  # list items get their defaults too
    }


def test_defaults_do_not_override_given_values():
    admitted, _ = validate_custom_resource(CRD, resource(scaling={"maxReplicas": 9}))
    assert admitted["spec"]["scaling"] == {"minReplicas": 1, "maxReplicas": 9, "target": "80%"}


def test_unknown_fields_are_pruned_except_where_preserved():
    obj = resource(surprise=1, extra={"anything": {"goes": True}}, labels={"team": "a"})
    obj["spec"]["model"]["quantum"] = "yes"
    obj["metadata"]["labels"] = {"kept": "yes"}
    obj["status"] = {"free": "form"}
    admitted, errors = validate_custom_resource(CRD, obj)
    assert errors == []
    assert "surprise" not in admitted["spec"] and "quantum" not in admitted["spec"]["model"]
    assert admitted["spec"]["extra"] == {"anything": {"goes": True}}
    assert admitted["spec"]["labels"] == {"team": "a"}
    assert admitted["metadata"]["labels"] == {"kept": "yes"} and admitted["status"] == {"free": "form"}


def test_the_input_is_not_modified():
    obj = resource(surprise=1)
    before = copy.deepcopy(obj)
    validate_custom_resource(CRD, obj)
    assert obj == before


def test_null_of_a_non_nullable_field_is_dropped_then_defaulted_and_nullable_keeps_null():
    admitted, errors = validate_custom_resource(CRD, resource(scaling=None, owner=None))
    assert errors == []
    assert admitted["spec"]["scaling"]["maxReplicas"] == 4 and admitted["spec"]["owner"] is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"model": {"name": 7}},
            'spec.model.name: Invalid value: "integer": spec.model.name in body must be of type string: "integer"',
        ),
        ({"model": {}}, "spec.model.name: Required value"),
        (
            {"model": {"name": "qwen", "dtype": "int3"}},
            'spec.model.dtype: Unsupported value: "int3": supported values: "auto", "float16", "bfloat16"',
        ),
        (
            {"scaling": {"minReplicas": 0, "maxReplicas": 0}},
            "spec.scaling.maxReplicas: Invalid value: 0: spec.scaling.maxReplicas in body should be greater than or equal to 1",
        ),
        (
            {"scaling": {"maxReplicas": 65}},
            "spec.scaling.maxReplicas: Invalid value: 65: spec.scaling.maxReplicas in body should be less than or equal to 64",
        ),
        (
            {"model": {"name": "Qwen"}},
            "spec.model.name: Invalid value: \"Qwen\": spec.model.name in body should match '^[a-z0-9/-]*$'",
        ),
        ({"model": {"name": "a" * 21}}, "spec.model.name: Too long: may not be more than 20 bytes"),
        (
            {"model": {"name": ""}},
            'spec.model.name: Invalid value: "": spec.model.name in body should be at least 1 chars long',
        ),
        ({"zones": ["a", "b", "c"]}, "spec.zones: Too many: 3: must have at most 2 items"),
        ({"zones": []}, "spec.zones: Invalid value: 0: spec.zones in body should have at least 1 items"),
        ({"zones": ["a", "a"]}, 'spec.zones: Duplicate value: "a"'),
        (
            {"scaling": {"target": 1.5}},
            'spec.scaling.target: Invalid value: "number": spec.scaling.target in body must be of type integer,string: "number"',
        ),
        ({"labels": {"team": "toolong"}}, "spec.labels.team: Too long: may not be more than 5 bytes"),
    ],
)
def test_each_kind_of_violation_names_its_field(spec, expected):
    merged = resource(**spec)
    if "model" in spec:
        merged["spec"]["model"] = spec["model"]
    assert errors_of(merged) == [expected]


def test_a_missing_required_top_level_field():
    obj = resource()
    del obj["spec"]["model"]
    assert errors_of(obj) == ["spec.model: Required value"]


def test_cel_rule_with_message_and_field_path():
    assert errors_of(resource(scaling={"minReplicas": 5, "maxReplicas": 2})) == [
        'spec.scaling.minReplicas: Invalid value: "object": minReplicas must not exceed maxReplicas'
    ]


def test_cel_list_macros_and_message_expression():
    routes = [{"name": "a", "weight": 0, "primary": True}, {"name": "b", "primary": True}]
    assert errors_of(resource(routes=routes)) == [
        'spec.routes: Invalid value: "array": weights must be positive',
        'spec.routes: Invalid value: "array": exactly one primary route, found 2',
    ]


def test_cel_has_and_reason():
    _, errors = validate_custom_resource(CRD, resource(gateway={"tls": True}))
    assert errors == [FieldError("spec.gateway", "Forbidden: TLS needs port 443", "FieldValueForbidden")]
    assert errors_of(resource(gateway={"tls": True, "port": 443})) == []


def test_transition_rule_with_old_self_is_checked_on_update_only():
    old, _ = validate_custom_resource(CRD, resource(storageClass="fast"))
    assert errors_of(resource(storageClass="slow")) == []  # a create has no oldSelf
    assert errors_of(resource(storageClass="slow"), old) == [
        'spec.storageClass: Invalid value: "string": storageClass is immutable'
    ]
    assert errors_of(resource(storageClass="fast"), old) == []


def test_an_unserved_api_version_is_refused():
    obj = {**resource(), "apiVersion": "example.test/v2"}
    assert errors_of(obj) == ['apiVersion: Unsupported value: "example.test/v2": supported values: "example.test/v1"']


def test_invalid_message_reads_like_kube_apiserver():
    one = [FieldError("spec.x", "Required value", "FieldValueRequired")]
    assert (
        invalid_message("RagTest", "example.test", "demo", one)
        == 'RagTest.example.test "demo" is invalid: spec.x: Required value'
    )
    two = one + [FieldError("spec.y", "Invalid value: 1: bad")]
    assert (
        invalid_message("RagTest", "example.test", "demo", two)
        == 'RagTest.example.test "demo" is invalid: [spec.x: Required value, spec.y: Invalid value: 1: bad]'
    )


def test_check_crd_refuses_a_rule_that_does_not_compile_and_a_wrong_name():
    broken = copy.deepcopy(CRD)
    broken["metadata"]["name"] = "wrong.example.test"
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] = [
        {"rule": "self.a >"}
    ]
    fields = [error.field for error in check_crd(broken)]
    assert fields == [
        "metadata.name",
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations",
    ]
    assert check_crd(CRD) == []


def test_the_api_server_answers_422_with_causes_and_stores_the_defaulted_object():
    with running_kube_api() as api, httpx.Client(base_url=api.url) as http:
        api.apply(CRD)
        url = "/apis/example.test/v1/namespaces/default/ragtests"
        refused = http.post(url, json=resource(scaling={"minReplicas": 0, "maxReplicas": 0}))
        assert refused.status_code == 422
        status = refused.json()
        assert status["reason"] == "Invalid"
        assert status["message"] == (
            'RagTest.example.test "demo" is invalid: spec.scaling.maxReplicas: Invalid value: 0: '
            "spec.scaling.maxReplicas in body should be greater than or equal to 1"
        )
        assert status["details"]["causes"] == [
            {
                "reason": "FieldValueInvalid",
                "field": "spec.scaling.maxReplicas",
                "message": "Invalid value: 0: spec.scaling.maxReplicas in body should be greater than or equal to 1",
            }
        ]
        created = http.post(url, json=resource(surprise=True))
        assert created.status_code == 201
        assert created.headers["Warning"] == "299 - " + json.dumps('unknown field "spec.surprise"')
        assert created.json()["spec"]["scaling"] == {"minReplicas": 1, "maxReplicas": 4, "target": "80%"}
        strict = http.post(
            url, params={"fieldValidation": "Strict"}, json={**resource(surprise=True), "metadata": {"name": "strict"}}
        )
        assert strict.status_code == 400 and 'unknown field "spec.surprise"' in strict.json()["message"]
        patched = http.patch(
            f"{url}/demo",
            json={"spec": {"storageClass": "fast"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert patched.status_code == 200
        immutable = http.patch(
            f"{url}/demo",
            json={"spec": {"storageClass": "slow"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert immutable.status_code == 422
        assert immutable.json()["details"]["causes"][0]["field"] == "spec.storageClass"
