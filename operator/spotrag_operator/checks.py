"""Problems the CRD schema cannot catch, found in what the cluster holds.

Pure: `named_objects` says which objects the spec names, the operator reads
them, and `find_problems` judges what it found. Each problem is a sentence that tells the user what to change; the operator
shows them in the Degraded condition and an Event, and keeps reconciling
(no crash, no hot loop) so fixing the cause is enough.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import render

# GPUs per node of the instance types people run vLLM on. An instance type
# not listed here is not judged.
INSTANCE_GPUS: dict[str, int] = {
    # AWS
    "g4dn.xlarge": 1,
    "g4dn.2xlarge": 1,
    "g4dn.4xlarge": 1,
    "g4dn.8xlarge": 1,
    "g4dn.12xlarge": 4,
    "g4dn.16xlarge": 1,
    "g4dn.metal": 8,
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.4xlarge": 1,
    "g5.8xlarge": 1,
    "g5.12xlarge": 4,
    "g5.16xlarge": 1,
    "g5.24xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "g6.2xlarge": 1,
    "g6.4xlarge": 1,
    "g6.8xlarge": 1,
    "g6.12xlarge": 4,
    "g6.16xlarge": 1,
    "g6.24xlarge": 4,
    "g6.48xlarge": 8,
    "g6e.xlarge": 1,
    "g6e.2xlarge": 1,
    "g6e.4xlarge": 1,
    "g6e.8xlarge": 1,
    "g6e.12xlarge": 4,
    "g6e.16xlarge": 1,
    "g6e.24xlarge": 4,
    "g6e.48xlarge": 8,
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
    "p5e.48xlarge": 8,
    "p5en.48xlarge": 8,
    # GCP
    "g2-standard-4": 1,
    "g2-standard-8": 1,
    "g2-standard-12": 1,
    "g2-standard-16": 1,
    "g2-standard-24": 2,
    "g2-standard-32": 1,
    "g2-standard-48": 4,
    "g2-standard-96": 8,
    "a2-highgpu-1g": 1,
    "a2-highgpu-2g": 2,
    "a2-highgpu-4g": 4,
    "a2-highgpu-8g": 8,
    "a2-ultragpu-1g": 1,
    "a2-ultragpu-2g": 2,
    "a2-ultragpu-4g": 4,
    "a2-ultragpu-8g": 8,
    "a3-highgpu-1g": 1,
    "a3-highgpu-2g": 2,
    "a3-highgpu-4g": 4,
    "a3-highgpu-8g": 8,
    "a3-megagpu-8g": 8,
    # Azure
    "Standard_NC24ads_A100_v4": 1,
    "Standard_NC48ads_A100_v4": 2,
    "Standard_NC96ads_A100_v4": 4,
    "Standard_ND96asr_v4": 8,
    "Standard_ND96isr_H100_v5": 8,
}

# NeuronCores per node of AWS Inferentia2 and Trainium instances, as the
# Neuron device plugin advertises aws.amazon.com/neuroncore (trn2 at its
# default logical NeuronCore size 2). The CRD's CEL rules hold the same table.
NEURON_CORES: dict[str, int] = {
    "inf2.xlarge": 2,
    "inf2.8xlarge": 2,
    "inf2.24xlarge": 12,
    "inf2.48xlarge": 24,
    "trn1.2xlarge": 2,
    "trn1.32xlarge": 32,
    "trn1n.32xlarge": 32,
    "trn2.48xlarge": 64,
}
INSTANCE_GPUS.update(NEURON_CORES)


def gpu_fit_problem(spec: dict) -> str | None:
    wanted = render.gpu_count(spec)
    types = spec["gpu"].get("instanceTypes") or []
    known = {t: INSTANCE_GPUS[t] for t in types if t in INSTANCE_GPUS}
    if not types or len(known) != len(types):
        return None
    if max(known.values()) < wanted:
        listing = ", ".join(f"{t} has {n}" for t, n in sorted(known.items()))
        return (
            f"an engine needs {wanted} GPUs on one node but no allowed instance type has that many ({listing}): "
            f"lower model.tensorParallelSize or allow a larger instance type in gpu.instanceTypes"
        )
    return None


def named_objects(spec: dict) -> list[tuple[str, str]]:
    """The (kind, name) of every object in the RAGDeployment's namespace that its spec names."""
    named = []
    if secret := spec["gateway"].get("apiKeySecret"):
        named.append(("Secret", secret))
    if token := spec["model"].get("hfTokenSecret"):
        named.append(("Secret", token["name"]))
    corpus = spec["retrieval"].get("corpus") or {}
    if spec["retrieval"]["enabled"] and corpus.get("configMap"):
        named.append(("ConfigMap", corpus["configMap"]))
    return named


def find_problems(spec: dict, namespace: str, found: Mapping[tuple[str, str], dict | None]) -> list[str]:
    """`found`: the objects of `named_objects`, None (or absent) where missing."""

    def missing(kind: str, name: str) -> bool:
        return found.get((kind, name)) is None

    problems: list[str] = []
    secret = spec["gateway"].get("apiKeySecret")
    if secret and missing("Secret", secret):
        problems.append(
            f"gateway.apiKeySecret names Secret {secret!r}, which does not exist in namespace {namespace!r}: create it or remove the field"
        )
    token = spec["model"].get("hfTokenSecret")
    if token and missing("Secret", token["name"]):
        problems.append(
            f"model.hfTokenSecret names Secret {token['name']!r}, which does not exist in namespace {namespace!r}"
        )
    corpus = spec["retrieval"].get("corpus") or {}
    if spec["retrieval"]["enabled"] and corpus.get("configMap") and missing("ConfigMap", corpus["configMap"]):
        problems.append(
            f"retrieval.corpus.configMap names ConfigMap {corpus['configMap']!r}, which does not exist in namespace {namespace!r}"
        )
    if problem := gpu_fit_problem(spec):
        problems.append(problem)
    if (spec["model"].get("standby") or {}).get("replicas") and render.is_neuron(spec):
        problems.append(
            "model.standby needs vLLM's sleep mode, which runs on NVIDIA and AMD GPUs only: "
            "Neuron engines cannot be kept asleep; remove model.standby"
        )
    return problems
