"""The RAGDeployment CRD as the API server would enforce it: every example
is valid, every bad RAGDeployment is rejected naming its field, and the
operator's view of defaults is the schema's."""

from __future__ import annotations

import copy

import pytest
import yaml

from spotrag_box.apiserver.crd_admission import check_crd, validate_custom_resource
from spotrag_operator.crd import CRD_PATH, defaulted_spec

from .operator_fixtures import EXAMPLES, ROOT, load_example

CRD = yaml.safe_load((ROOT / "crds" / "spotrag.io_ragdeployments.yaml").read_text())


def test_operator_reads_the_same_crd_file():
    assert CRD_PATH.resolve() == (ROOT / "crds" / "spotrag.io_ragdeployments.yaml").resolve()


def test_crd_is_structural_and_its_rules_compile():
    assert check_crd(CRD) == []


def _every_property(schema: dict, path: str = ""):
    for name, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from _every_property(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _every_property(schema["items"], f"{path}[]")


def test_every_spec_field_is_described_for_kubectl_explain():
    spec = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    undocumented = [
        path
        for path, sub in _every_property(spec)
        if not sub.get("description")
        and path
        not in {
            ".scaling.prometheus.url",
            ".retrieval.corpus.persistentVolumeClaim.name",
            ".retrieval.corpus.persistentVolumeClaim.path",
            ".pricing.onDemandPerGpuHour",
            ".pricing.spotPerGpuHour",
        }
    ]
    assert undocumented == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example):
    for document in yaml.safe_load_all(example.read_text()):
        if document and document.get("kind") == "RAGDeployment":
            _, errors = validate_custom_resource(CRD, document)
            assert errors == [], [str(e) for e in errors]


def test_admission_defaults_equal_the_operators_defaults():
    body = load_example("basic.yaml")
    defaulted, errors = validate_custom_resource(CRD, body)
    assert errors == []
    assert defaulted["spec"] == defaulted_spec(body)


BAD = [
    ("missing model", {"model": None}, "spec.model"),
    ("empty model name", {"model": {"name": ""}}, "spec.model.name"),
    ("odd model URI", {"model": {"name": "ftp://host/model"}}, "spec.model.name"),
    ("tensor parallel 3", {"model": {"tensorParallelSize": 3}}, "spec.model.tensorParallelSize"),
    ("tensor parallel 16", {"model": {"tensorParallelSize": 16}}, "spec.model.tensorParallelSize"),
    ("gpu memory above 1", {"model": {"gpuMemoryUtilization": 1.5}}, "spec.model.gpuMemoryUtilization"),
    ("unknown dtype", {"model": {"dtype": "int3"}}, "spec.model.dtype"),
    ("min above max", {"scaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.scaling.minReplicas"),
    ("baseline above max", {"scaling": {"onDemandBaseline": 9, "maxReplicas": 4}}, "spec.scaling.onDemandBaseline"),
    ("negative replicas", {"scaling": {"minReplicas": -1}}, "spec.scaling.minReplicas"),
    ("relative cache path", {"model": {"cache": {"hostPath": "models"}}}, "spec.model.cache.hostPath"),
    ("cache without a path", {"model": {"cache": {"minFreeGi": 10}}}, "spec.model.cache.hostPath"),
    ("unknown load format", {"model": {"loadFormat": "magic"}}, "spec.model.loadFormat"),
    ("too many standbys", {"model": {"standby": {"replicas": 99}}}, "spec.model.standby.replicas"),
    ("no wake timeout", {"model": {"standby": {"wakeTimeoutSeconds": 0}}}, "spec.model.standby.wakeTimeoutSeconds"),
    ("cold start hold of 0", {"scaling": {"coldStartTimeoutSeconds": 0}}, "spec.scaling.coldStartTimeoutSeconds"),
    ("gpu count below TP", {"model": {"tensorParallelSize": 4}, "gpu": {"count": 2}}, "spec.gpu.count"),
    ("template without question", {"prompt": {"template": "References: {contexts}"}}, "spec.prompt.template"),
    ("two corpus sources", {"retrieval": {"corpus": {"configMap": "a", "uri": "s3://b/c"}}}, "spec.retrieval.corpus"),
    ("no corpus source", {"retrieval": {"corpus": {"chunkTokens": 100}}}, "spec.retrieval.corpus"),
    ("top_k zero", {"retrieval": {"topK": 0}}, "spec.retrieval.topK"),
    ("score threshold 2", {"retrieval": {"scoreThreshold": 2}}, "spec.retrieval.scoreThreshold"),
    ("service type", {"gateway": {"serviceType": "Ingress"}}, "spec.gateway.serviceType"),
    ("fallback too short", {"spot": {"fallbackAfterSeconds": 1}}, "spec.spot.fallbackAfterSeconds"),
    ("string replicas", {"gateway": {"replicas": "two"}}, "spec.gateway.replicas"),
    ("zero gateway workers", {"gateway": {"workers": 0}}, "spec.gateway.workers"),
    (
        "gateway min above max",
        {"gateway": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "spec.gateway.autoscaling.minReplicas",
    ),
    ("gateway autoscaling without max", {"gateway": {"autoscaling": {}}}, "spec.gateway.autoscaling.maxReplicas"),
    ("negative price", {"pricing": {"spotPerGpuHour": -1}}, "spec.pricing.spotPerGpuHour"),
]


@pytest.mark.parametrize("case, patch, field", BAD, ids=[b[0] for b in BAD])
def test_bad_ragdeployments_are_rejected_naming_the_field(case, patch, field):
    body = load_example("basic.yaml")
    for section, value in patch.items():
        if value is None:
            body["spec"].pop(section, None)
        elif isinstance(value, dict):
            body["spec"][section] = {**copy.deepcopy(body["spec"].get(section) or {}), **value}
        else:
            body["spec"][section] = value
    _, errors = validate_custom_resource(CRD, body)
    assert errors, f"{case} was accepted"
    assert any(e.field == field for e in errors), [str(e) for e in errors]


NEURON = "aws.amazon.com/neuroncore"
NEURON_IMAGE = "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:0.16.0-neuronx-py311-sdk2.29.0-ubuntu22.04"

# (case, spec patch on examples/eks-inf2.yaml or basic.yaml, the field the rejection names)
ACCELERATOR_BAD = [
    ("GPU tensor parallel 24", "basic.yaml", {"model": {"tensorParallelSize": 24}}, "spec.model.tensorParallelSize"),
    ("GPU count 24", "basic.yaml", {"gpu": {"count": 24}}, "spec.gpu.count"),
    (
        "Neuron tensor parallel 3",
        "eks-inf2.yaml",
        {"model": {"tensorParallelSize": 3}},
        "spec.model.tensorParallelSize",
    ),
    (
        "Neuron TP 32 on inf2.48xlarge (24 cores)",
        "eks-inf2.yaml",
        {"model": {"tensorParallelSize": 32}},
        "spec.model.tensorParallelSize",
    ),
    (
        "Neuron TP 24 on trn1.32xlarge (32 cores)",
        "eks-inf2.yaml",
        {"gpu": {"instanceTypes": ["trn1.32xlarge"]}},
        "spec.model.tensorParallelSize",
    ),
    (
        "Neuron on a GPU instance type",
        "eks-inf2.yaml",
        {"gpu": {"instanceTypes": ["g6.48xlarge"]}},
        "spec.model.tensorParallelSize",
    ),
    ("Neuron with AWQ", "eks-inf2.yaml", {"model": {"quantization": "awq"}}, "spec.model.quantization"),
    ("Neuron with gpu.products", "eks-inf2.yaml", {"gpu": {"products": ["NVIDIA-L4"]}}, "spec.gpu.products"),
    (
        "Neuron with the CUDA image",
        "eks-inf2.yaml",
        {"model": {"image": "vllm/vllm-openai:v0.26.0"}},
        "spec.model.image",
    ),
    (
        "Neuron with a GPU index Job",
        "eks-inf2.yaml",
        {"retrieval": {"corpus": {"configMap": "docs", "gpu": True}}},
        "spec.retrieval.corpus.gpu",
    ),
    (
        "neurondevice without a count",
        "eks-inf2.yaml",
        {"gpu": {"resourceName": "aws.amazon.com/neurondevice"}},
        "spec.gpu.count",
    ),
    ("zero nodes per engine", "basic.yaml", {"gpu": {"nodesPerEngine": 0}}, "spec.gpu.nodesPerEngine"),
]


def _patched(example: str, patch: dict) -> dict:
    body = load_example(example) if example == "basic.yaml" else _ragd(example)
    for section, value in patch.items():
        body["spec"][section] = {**copy.deepcopy(body["spec"].get(section) or {}), **value}
    return body


def _ragd(example: str) -> dict:
    return next(
        d for d in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if d["kind"] == "RAGDeployment"
    )


@pytest.mark.parametrize("case, example, patch, field", ACCELERATOR_BAD, ids=[b[0] for b in ACCELERATOR_BAD])
def test_accelerator_mismatches_are_rejected_naming_the_field(case, example, patch, field):
    _, errors = validate_custom_resource(CRD, _patched(example, patch))
    assert errors, f"{case} was accepted"
    assert any(e.field == field for e in errors), [str(e) for e in errors]


ACCELERATOR_GOOD = [
    ("inf2.48xlarge TP 24", {}),
    ("inf2.48xlarge TP 8 (three engines' worth of cores)", {"model": {"tensorParallelSize": 8}}),
    ("trn1.32xlarge TP 32", {"model": {"tensorParallelSize": 32}, "gpu": {"instanceTypes": ["trn1.32xlarge"]}}),
    ("neurondevice, 12 chips", {"gpu": {"resourceName": "aws.amazon.com/neurondevice", "count": 12}}),
    ("two inf2 nodes per engine", {"gpu": {"nodesPerEngine": 2}}),
]


@pytest.mark.parametrize("case, patch", ACCELERATOR_GOOD, ids=[g[0] for g in ACCELERATOR_GOOD])
def test_neuron_shapes_the_hardware_has_are_accepted(case, patch):
    _, errors = validate_custom_resource(CRD, _patched("eks-inf2.yaml", patch))
    assert errors == [], [str(e) for e in errors]
