"""The RAGDeployment CRD as the operator sees it: loaded from the same file
that `crds/` and the chart ship, so the defaults the operator relies on are
the ones the API server applies (one source of truth, nothing restated)."""

from __future__ import annotations

import copy
import functools
import pathlib
from typing import Any

import yaml

GROUP = "spotrag.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RAGDeployment"
PLURAL = "ragdeployments"

CRD_PATH = pathlib.Path(__file__).with_name("crd.yaml")


@functools.cache
def load_crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def openapi_schema(version: str = VERSION) -> dict:
    for entry in load_crd()["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise LookupError(f"the CRD has no version {version}")


def apply_schema_defaults(schema: dict, value: Any) -> Any:
    """Structural defaulting as kube-apiserver does it: a missing field with a
    `default` gets it (then is defaulted itself); present objects are walked."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_schema_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                value[name] = apply_schema_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_schema_defaults(schema["items"], item) for item in value]
    return value


def defaulted_spec(body: dict) -> dict:
    """The RAGDeployment's spec with every CRD default filled in.

    A real API server already did this; doing it again is a no-op there and
    makes the operator correct against objects stored before a default was
    added (the server defaults those on read, too).
    """
    spec = copy.deepcopy(dict(body.get("spec") or {}))
    return apply_schema_defaults(openapi_schema()["properties"]["spec"], spec)
