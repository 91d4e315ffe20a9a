"""RAGDeployment bodies for the operator's tests, defaulted by the CRD itself."""

from __future__ import annotations

import copy
import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def ragdeployment(spec_overrides: dict | None = None, *, name: str = "handbook", namespace: str = "default") -> dict:
    """A RAGDeployment as the API server would return it (uid set)."""
    body = load_example("basic.yaml")
    body["metadata"].update(name=name, namespace=namespace, uid="8f0e-uid", generation=1)
    body["spec"] = deep_merge(body["spec"], spec_overrides or {})
    return body


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
