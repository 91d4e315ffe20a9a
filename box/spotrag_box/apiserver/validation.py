"""What the API stand-in checks and fills in on a write, before it is stored: kind, name, schema, defaults."""

import datetime
import json
import re
from collections.abc import Callable
from typing import Any

from spotrag_box.apiserver import crd_admission as admission
from spotrag_box.apiserver.errors import ApiError, invalid
from spotrag_box.apiserver.registry import CRDS, Served

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAMED_KINDS = frozenset({"Namespace", "Service"})


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_kind(served: Served, obj: dict[str, Any]) -> None:
    """apiVersion and kind, when given, must be the URL's; they are then set from it."""
    if obj.get("kind") not in (None, "", served.kind):
        raise ApiError(
            400,
            "BadRequest",
            f"the kind of the object ({obj['kind']}) does not match the resource {served.qualified} ({served.kind})",
        )
    if obj.get("apiVersion") not in (None, "", served.api_version):
        raise ApiError(
            400,
            "BadRequest",
            f"the API version in the data ({obj['apiVersion']}) does not match "
            f"the expected API version ({served.api_version})",
        )
    obj["apiVersion"], obj["kind"] = served.api_version, served.kind


def check_name(served: Served, name: str) -> None:
    as_label = served.kind in _LABEL_NAMED_KINDS
    pattern, limit = (_DNS_LABEL, 63) if as_label else (_DNS_SUBDOMAIN, 253)
    if len(name) > limit or not pattern.match(name):
        kind_of_name = "RFC 1123 label" if as_label else "RFC 1123 subdomain"
        raise invalid(
            served,
            name,
            [
                admission.FieldError(
                    "metadata.name",
                    f"Invalid value: {json.dumps(name)}: a lowercase {kind_of_name} must consist of "
                    f"lower case alphanumeric characters{'' if as_label else ', ' + repr('.')}"
                    f" or '-', and must start and end with an alphanumeric character",
                )
            ],
        )


def admit(
    served: Served, obj: dict[str, Any], old: dict[str, Any] | None, field_validation: str
) -> tuple[dict[str, Any], list[str]]:
    """Custom resources go through their CRD's schema (defaults, pruning, validation, CEL)."""
    if served.crd is None:
        if served.storage == CRDS:
            errors = admission.check_crd(obj)
            if errors:
                raise invalid(served, obj["metadata"]["name"], errors)
        return obj, []
    result = admission.admit_custom_resource(served.crd, obj, old)
    if result.errors:
        raise invalid(served, obj["metadata"].get("name", ""), result.errors)
    if result.unknown_fields and field_validation == "Strict":
        unknown = ", ".join(f'unknown field "{field}"' for field in result.unknown_fields)
        raise ApiError(400, "BadRequest", f"strict decoding error: {unknown}")
    warnings = [f'unknown field "{field}"' for field in result.unknown_fields] if field_validation == "Warn" else []
    return result.object, warnings


def set_builtin_defaults(served: Served, obj: dict[str, Any], next_cluster_ip: Callable[[], str]) -> None:
    """What the built-in registries set on create (the parts clients look at)."""
    match served.kind:
        case "Pod":
            obj["status"] = {"phase": "Pending"}
        case "Namespace":
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            obj["status"] = {"phase": "Active"}
        case "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                spec["clusterIP"] = next_cluster_ip()
            if spec.get("clusterIP"):
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
        case "CustomResourceDefinition":
            names = obj["spec"]["names"]
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
                "conditions": [
                    {
                        "type": condition,
                        "status": "True",
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": now(),
                    }
                    for condition, reason, message in [
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ]
                ],
            }


def omit_empty_metadata(obj: dict[str, Any]) -> None:
    """Go's omitempty: an emptied list or map in metadata is absent, not [] or {}."""
    metadata = obj["metadata"]
    for key in ("finalizers", "ownerReferences", "labels", "annotations"):
        if key in metadata and not metadata[key]:
            del metadata[key]
