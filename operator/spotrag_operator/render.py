"""Pure functions from a RAGDeployment (defaulted spec) to the objects it owns.

Nothing here talks to the API: the operator, the tests and the simulator all
call these and get the same manifests. Every object carries the owner
reference, so deleting the RAGDeployment garbage-collects everything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

from spotrag_runtime.kube.resources import owner_reference

ENGINE_PORT = 8000
GATEWAY_PORT = 8080
GATEWAY_CONFIG_PATH = "/etc/spotrag/gateway.json"
API_KEYS_DIR = "/etc/spotrag/api-keys"
INDEX_MOUNT = "/var/lib/spotrag/index"
MODEL_CACHE_MOUNT = "/root/.cache/huggingface"
PVC_MODEL_MOUNT = "/models"

LABEL_DEPLOYMENT = "spotrag.io/deployment"
LABEL_COMPONENT = "spotrag.io/component"
LABEL_CAPACITY = "spotrag.io/capacity"
LABEL_SERVING = "spotrag.io/serving"
LABEL_SPEC_HASH = "spotrag.io/spec-hash"
LABEL_STANDBY = "spotrag.io/standby"  # a warm standby engine, asleep out of serving

SPOT = "spot"
ON_DEMAND = "on-demand"
CAPACITY_TYPES = (ON_DEMAND, SPOT)

# How each cloud labels a node's capacity type. A pod's node affinity ORs one
# term per convention, so the same RAGDeployment places correctly on
# Karpenter, EKS managed node groups, GKE, AKS, or nodes labelled by hand
# (and by the simulated cluster) with spotrag.io/capacity.
CAPACITY_NODE_TERMS: dict[str, list[list[dict]]] = {
    SPOT: [
        [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]}],
        [{"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["SPOT"]}],
        [{"key": "cloud.google.com/gke-spot", "operator": "In", "values": ["true"]}],
        [{"key": "cloud.google.com/gke-preemptible", "operator": "In", "values": ["true"]}],
        [{"key": "kubernetes.azure.com/scalesetpriority", "operator": "In", "values": ["spot"]}],
        [{"key": LABEL_CAPACITY, "operator": "In", "values": [SPOT]}],
    ],
    ON_DEMAND: [
        [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand", "reserved"]}],
        [{"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["ON_DEMAND"]}],
        # GKE and AKS mark only spot nodes, so "on-demand" there is "a node of
        # that cloud without the spot label".
        [
            {"key": "cloud.google.com/gke-nodepool", "operator": "Exists"},
            {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"},
            {"key": "cloud.google.com/gke-preemptible", "operator": "DoesNotExist"},
        ],
        [
            {"key": "kubernetes.azure.com/agentpool", "operator": "Exists"},
            {"key": "kubernetes.azure.com/scalesetpriority", "operator": "DoesNotExist"},
        ],
        [{"key": LABEL_CAPACITY, "operator": "In", "values": [ON_DEMAND]}],
    ],
}

# Taints spot node pools carry on their own (GKE Autopilot, AKS), tolerated by
# spot engines only.
SPOT_TOLERATIONS = [
    {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
]

# Seconds added to the grace period beyond preStop + vLLM's shutdown timeout,
# so the kubelet never kills an engine that is still finishing on time.
GRACE_MARGIN_SECONDS = 15


def resource_name(body: dict, suffix: str = "") -> str:
    return body["metadata"]["name"] + (f"-{suffix}" if suffix else "")


def served_model_name(body: dict, spec: dict) -> str:
    return spec["model"].get("servedModelName") or body["metadata"]["name"]


def common_labels(body: dict, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"spotrag-{component}",
        "app.kubernetes.io/instance": body["metadata"]["name"],
        "app.kubernetes.io/managed-by": "spotrag-operator",
        "app.kubernetes.io/part-of": "spotrag",
        LABEL_DEPLOYMENT: body["metadata"]["name"],
        LABEL_COMPONENT: component,
    }


def engine_selector(body: dict) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: body["metadata"]["name"], LABEL_COMPONENT: "engine"}


def _metadata(body: dict, name: str, component: str, **extra: Any) -> dict:
    meta = {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": common_labels(body, component),
        "ownerReferences": [owner_reference(body)],
    }
    meta.update(extra)
    return meta


def _hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def engine_spec_hash(spec: dict) -> str:
    """What, when changed, needs new engine pods (a rollout): the model, the
    GPUs and the drain timing. Scaling changes need none."""
    return _hash({"model": spec["model"], "gpu": spec["gpu"], "preStop": spec["interruption"]["preStopSeconds"]})


def gpu_count(spec: dict) -> int:
    return spec["gpu"].get("count") or spec["model"]["tensorParallelSize"]


# Accelerators -------------------------------------------------------------

# The AWS Neuron device plugin's resources (Inferentia2, Trainium): one per
# NeuronCore, or one per chip (2 NeuronCores on inf2 and trn1).
NEURON_CORE = "aws.amazon.com/neuroncore"
NEURON_DEVICE = "aws.amazon.com/neurondevice"
# The taint EKS and Karpenter Neuron NodePools put on their nodes
# (docs/install-eks.md), tolerated by Neuron engines only.
NEURON_TAINT = "aws.amazon.com/neuron"
NEURON_COMPILE_CACHE = f"{MODEL_CACHE_MOUNT}/neuron-compile-cache"


def is_neuron(spec: dict) -> bool:
    """Engines on AWS Inferentia/Trainium: the spec asks for a Neuron device plugin resource."""
    return spec["gpu"]["resourceName"].startswith("aws.amazon.com/neuron")


def accelerator_args(spec: dict) -> list[str]:
    """Flags that differ by accelerator. vLLM on Neuron sizes its KV cache from
    the Neuron config, not from a share of GPU memory, so it gets no
    --gpu-memory-utilization; the platform is detected by the vllm-neuron
    plugin in the image."""
    if is_neuron(spec):
        return []
    return ["--gpu-memory-utilization", str(spec["model"]["gpuMemoryUtilization"])]


def accelerator_tolerations(spec: dict) -> list[dict]:
    return [{"key": NEURON_TAINT, "operator": "Exists", "effect": "NoSchedule"}] if is_neuron(spec) else []


def accelerator_env(spec: dict) -> list[dict]:
    """Neuron compiles the model for its shapes at first load: the compiled
    artifacts go to the model cache volume, so a restarted container on the
    same node skips the compile."""
    if not is_neuron(spec):
        return []
    return [{"name": "NEURON_COMPILE_CACHE_URL", "value": NEURON_COMPILE_CACHE}]


# Engines -----------------------------------------------------------------


def engine_args(body: dict, spec: dict) -> list[str]:
    """`vllm serve` arguments from the spec: upstream flags only."""
    model = spec["model"]
    name = model["name"]
    args: list[str] = []
    if name.startswith("hf://"):
        args.append(name.removeprefix("hf://"))
    elif name.startswith("pvc://"):
        _, _, path = name.removeprefix("pvc://").partition("/")
        args.append(f"{PVC_MODEL_MOUNT}/{path}".rstrip("/"))
    else:
        args.append(name)
    args += weight_loading_args(spec)
    args += [
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
        "--served-model-name",
        served_model_name(body, spec),
        "--tensor-parallel-size",
        str(model["tensorParallelSize"]),
        *accelerator_args(spec),
        "--max-model-len",
        str(model["maxModelLen"]),
        "--dtype",
        model["dtype"],
        "--shutdown-timeout",
        str(model["shutdownTimeoutSeconds"]),
        "--enable-prefix-caching" if model["enablePrefixCaching"] else "--no-enable-prefix-caching",
    ]
    if model.get("quantization"):
        args += ["--quantization", model["quantization"]]
    if speculative := model.get("speculative"):
        config = (
            {"method": "ngram", "num_speculative_tokens": speculative["numSpeculativeTokens"], "prompt_lookup_max": 4}
            if speculative["model"] == "ngram"
            else {"model": speculative["model"], "num_speculative_tokens": speculative["numSpeculativeTokens"]}
        )
        args += ["--speculative-config", json.dumps(config, sort_keys=True)]
    if adapters := model.get("loraAdapters"):
        args += ["--enable-lora", "--lora-modules", *(f"{a['name']}={a['source']}" for a in adapters)]
    args += model.get("extraArgs") or []
    return args


# Engines that start in seconds ------------------------------------------------

# With spec.model.cache: the node's folder, the pod's own, and the link between.
NODE_CACHE_MOUNT = "/var/cache/spotrag/node"
POD_CACHE_MOUNT = "/var/cache/spotrag/pod"
CACHE_LINK_MOUNT = "/var/cache/spotrag/link"
CACHE_LINK = f"{CACHE_LINK_MOUNT}/current"
CACHE_INIT_CONTAINER = "model-cache"
# vLLM's dev-mode endpoints (/sleep, /wake_up, /is_sleeping) need this with --enable-sleep-mode.
SLEEP_MODE_ENV = {"name": "VLLM_SERVER_DEV_MODE", "value": "1"}


def standby_replicas(spec: dict) -> int:
    """Standby engines kept asleep (spec.model.standby; 0 without it, and on
    Neuron, where vLLM has no sleep mode: checks.find_problems says so)."""
    if is_neuron(spec):
        return 0
    return (spec["model"].get("standby") or {}).get("replicas", 0)


def weight_loading_args(spec: dict) -> list[str]:
    """Upstream flags for loading fast: the weights' load format (the Run:ai
    streamer for object storage unless told otherwise) and sleep mode for standbys."""
    model = spec["model"]
    load_format = model.get("loadFormat")
    if load_format is None and model["name"].startswith(("s3://", "gs://")):
        load_format = "runai_streamer"  # vLLM reads object storage only through the streamer
    args = ["--load-format", load_format] if load_format and load_format != "auto" else []
    if standby_replicas(spec):
        args.append("--enable-sleep-mode")
    return args


def node_model_cache(spec: dict, gateway_image: str) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(env, volumes, mounts, init containers) of spec.model.cache: HF_HOME and
    VLLM_CACHE_ROOT go through a link an init container points at the node's
    folder, or at the pod's own if the node's cannot be written or is too full
    (runtime/spotrag_runtime/model_cache). Nothing without spec.model.cache."""
    cache = spec["model"].get("cache")
    if not cache:
        return [], [], [], []
    env = [
        {"name": "HF_HOME", "value": f"{CACHE_LINK}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_LINK}/vllm"},
    ]
    if is_neuron(spec):  # the Neuron compiler's cache is kept on the node too
        env.append({"name": "NEURON_COMPILE_CACHE_URL", "value": f"{CACHE_LINK}/neuron-compile-cache"})
    volumes = [
        {"name": "node-model-cache", "hostPath": {"path": cache["hostPath"], "type": "DirectoryOrCreate"}},
        {"name": "model-cache-link", "emptyDir": {"sizeLimit": "1Mi"}},
    ]
    mounts = [
        {"name": "node-model-cache", "mountPath": NODE_CACHE_MOUNT},
        {"name": "model-cache", "mountPath": POD_CACHE_MOUNT},
        {"name": "model-cache-link", "mountPath": CACHE_LINK_MOUNT},
    ]
    command = ["spotrag", "model-cache", "prepare", "--node", NODE_CACHE_MOUNT, "--pod", POD_CACHE_MOUNT]
    command += ["--link", CACHE_LINK, "--min-free-gi", str(cache.get("minFreeGi", 0))]
    init = {
        "name": CACHE_INIT_CONTAINER,
        "image": gateway_image,
        "command": command,
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
    }
    return env, volumes, mounts, [init]


def standby_pod(body: dict, spec: dict, capacity: str) -> dict:
    """A warm standby (spec.model.standby): an engine pod out of the serving set
    until the operator wakes it (operator/spotrag_operator/standby.py)."""
    pod = engine_pod(body, spec, capacity)
    pod["metadata"]["labels"] |= {LABEL_SERVING: "false", LABEL_STANDBY: "true"}
    pod["metadata"]["generateName"] = resource_name(body, "standby-")
    return pod


def _engine_affinity(spec: dict, capacity: str) -> dict:
    gpu = spec["gpu"]
    narrowing: list[dict] = []
    if gpu.get("products"):
        narrowing.append({"key": "nvidia.com/gpu.product", "operator": "In", "values": list(gpu["products"])})
    if gpu.get("instanceTypes"):
        narrowing.append(
            {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": list(gpu["instanceTypes"])}
        )
    terms = [{"matchExpressions": term + narrowing} for term in CAPACITY_NODE_TERMS[capacity]]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def _engine_spread(body: dict, spec: dict) -> list[dict]:
    selector = {"matchLabels": engine_selector(body)}
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": selector,
        }
    ]
    if spec["gpu"]["spreadOverZones"]:
        spread.append(
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": selector,
            }
        )
    return spread


def engine_grace_seconds(spec: dict) -> int:
    return spec["interruption"]["preStopSeconds"] + spec["model"]["shutdownTimeoutSeconds"] + GRACE_MARGIN_SECONDS


def engine_pod(body: dict, spec: dict, capacity: str) -> dict:
    """One engine: the upstream vLLM OpenAI server on `gpu_count` GPUs of one node."""
    if capacity not in CAPACITY_TYPES:
        raise ValueError(f"unknown capacity type {capacity!r}")
    model = spec["model"]
    gpu = spec["gpu"]
    gpus = gpu_count(spec)
    spec_hash = engine_spec_hash(spec)
    labels = common_labels(body, "engine") | {
        LABEL_CAPACITY: capacity,
        LABEL_SERVING: "true",
        LABEL_SPEC_HASH: spec_hash,
    }
    env = [{"name": "HF_HOME", "value": MODEL_CACHE_MOUNT}, *accelerator_env(spec)]
    if token := model.get("hfTokenSecret"):
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token["key"]}}})
    volumes: list[dict] = [
        # vLLM's tensor-parallel workers exchange data through shared memory.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(2, 4 * gpus)}Gi"}},
        {"name": "model-cache", "emptyDir": {"sizeLimit": model["cacheSize"]}},
    ]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT},
    ]
    if model["name"].startswith("pvc://"):
        claim = model["name"].removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": PVC_MODEL_MOUNT, "readOnly": True})
    cache_env, cache_volumes, cache_mounts, init_containers = node_model_cache(spec, spec["gateway"]["image"])
    if cache_env:
        env = [e for e in env if e["name"] not in {c["name"] for c in cache_env}] + cache_env
        volumes += cache_volumes
        mounts = [m for m in mounts if m["name"] != "model-cache"] + cache_mounts
    if standby_replicas(spec):
        env.append(SLEEP_MODE_ENV)
    # Fits the smallest GPU instances (g6.xlarge: 3920m / 14.5Gi allocatable); raise it in model.resources.
    resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {}}
    user_resources = model.get("resources") or {}
    resources["requests"].update(user_resources.get("requests") or {})
    resources["limits"].update(user_resources.get("limits") or {})
    resources["requests"][gpu["resourceName"]] = str(gpus)
    resources["limits"][gpu["resourceName"]] = str(gpus)
    tolerations = [{"key": gpu["resourceName"], "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += accelerator_tolerations(spec)
    if capacity == SPOT:
        tolerations += SPOT_TOLERATIONS
    tolerations += gpu.get("tolerations") or []
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": engine_grace_seconds(spec),
        "enableServiceLinks": False,
        "affinity": _engine_affinity(spec, capacity),
        "tolerations": tolerations,
        "topologySpreadConstraints": _engine_spread(body, spec),
        "containers": [
            {
                "name": "vllm",
                "image": model["image"],
                "command": ["vllm", "serve"],
                "args": engine_args(body, spec),
                "env": env,
                "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
                "resources": resources,
                "volumeMounts": mounts,
                # Loading weights can take many minutes; only then do the other probes start.
                "startupProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 10,
                    "failureThreshold": 180,
                },
                "readinessProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 5,
                    "failureThreshold": 3,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 10,
                    "failureThreshold": 6,
                },
                # Keep serving while every endpoint list in the cluster catches up with the
                # pod's removal; vLLM's --shutdown-timeout then finishes running requests.
                "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(spec["interruption"]["preStopSeconds"])]}}},
            }
        ],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if gpu.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(gpu["nodeSelector"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": resource_name(body, "engine-"),
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "annotations": {"spotrag.io/gpus": str(gpus)},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": pod_spec,
    }


def engines_service(body: dict) -> dict:
    """Headless Service of the engines that serve: the gateways' endpoint list.

    It selects `spotrag.io/serving=true`, so flipping that label takes an
    engine out of every gateway's list before the pod is deleted.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, resource_name(body, "engines"), "engine"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": engine_selector(body) | {LABEL_SERVING: "true"},
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# Gateway -----------------------------------------------------------------


def gateway_config(body: dict, spec: dict) -> dict:
    """What the gateway reads from /etc/spotrag/gateway.json (docs/gateway.md)."""
    retrieval = spec["retrieval"]
    gateway = spec["gateway"]
    return {
        "deployment": body["metadata"]["name"],
        "namespace": body["metadata"]["namespace"],
        "servedModelName": served_model_name(body, spec),
        "engineModel": spec["model"]["name"],
        "maxModelLen": spec["model"]["maxModelLen"],
        "retrieval": {
            "enabled": retrieval["enabled"],
            "embeddingModel": retrieval["embeddingModel"],
            "queryPrefix": retrieval["queryPrefix"],
            "passagePrefix": retrieval["passagePrefix"],
            "indexPath": INDEX_MOUNT,
            "topK": retrieval["topK"],
            "scoreThreshold": retrieval["scoreThreshold"],
            "device": "auto",
        },
        "prompt": {
            "system": spec["prompt"]["system"],
            "template": spec["prompt"]["template"],
            "contextTokenBudget": retrieval["contextTokenBudget"],
        },
        "engines": {
            "discovery": "endpointslices",
            "service": resource_name(body, "engines"),
            "namespace": body["metadata"]["namespace"],
            "port": ENGINE_PORT,
        },
        "admission": {
            "maxInflightTokensPerEngine": gateway["maxInflightTokensPerEngine"],
            "maxQueuedRequests": gateway["maxQueuedRequests"],
            "queueTimeoutSeconds": gateway["queueTimeoutSeconds"],
            "prefixAffinity": spec["model"]["enablePrefixCaching"],
        }
        | scale_to_zero_admission(spec),
        "auth": {"apiKeysDir": API_KEYS_DIR if gateway.get("apiKeySecret") else None},
        "ui": {"enabled": gateway["ui"]["enabled"], "path": gateway["ui"]["path"]},
    }


def scales_to_zero(spec: dict) -> bool:
    """minReplicas 0 and no on-demand baseline: an idle deployment runs no engine."""
    scaling = spec["scaling"]
    return scaling["minReplicas"] == 0 and scaling["onDemandBaseline"] == 0


def scale_to_zero_admission(spec: dict) -> dict:
    """The gateway's part in scaling to zero: stay ready and hold requests while
    no engine exists (its queued tokens make the operator start one), for up
    to scaling.coldStartTimeoutSeconds."""
    if not scales_to_zero(spec):
        return {}
    return {"queueWithoutEngines": True, "coldStartTimeoutSeconds": spec["scaling"]["coldStartTimeoutSeconds"]}


def gateway_configmap(body: dict, spec: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, resource_name(body, "gateway"), "gateway"),
        "data": {"gateway.json": json.dumps(gateway_config(body, spec), indent=2, sort_keys=True)},
    }


def gateway_service_account(body: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(body, resource_name(body, "gateway"), "gateway"),
        "automountServiceAccountToken": True,
    }


def gateway_role(body: dict) -> dict:
    """The gateway may only read the EndpointSlices of its namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(body, resource_name(body, "gateway"), "gateway"),
        "rules": [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ],
    }


def gateway_role_binding(body: dict) -> dict:
    name = resource_name(body, "gateway")
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(body, name, "gateway"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": body["metadata"]["namespace"]}],
    }


def gateway_selector(body: dict) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: body["metadata"]["name"], LABEL_COMPONENT: "gateway"}


# A gateway pod being removed (scale-in, rollout, node drain) first waits this long
# for its endpoint to leave the Service everywhere, then stops taking connections
# and lets its streams finish for up to the gateway's own shutdown grace.
GATEWAY_PRESTOP_SECONDS = 5
GATEWAY_SHUTDOWN_GRACE_SECONDS = 25  # spotrag_runtime.gateway.cli.SHUTDOWN_GRACE_SECONDS
GATEWAY_GRACE_SECONDS = GATEWAY_PRESTOP_SECONDS + GATEWAY_SHUTDOWN_GRACE_SECONDS + GRACE_MARGIN_SECONDS


def _cpu_cores(quantity: Any) -> float | None:
    """A Kubernetes CPU quantity ("2", "1500m", 0.5) in cores; None if unreadable."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def gateway_workers(spec: dict) -> int:
    """Worker processes per gateway pod: ``gateway.workers``, else one per core
    of the CPU request in ``gateway.resources``, else 1."""
    gateway = spec["gateway"]
    if gateway.get("workers"):
        return int(gateway["workers"])
    cpu = _cpu_cores(((gateway.get("resources") or {}).get("requests") or {}).get("cpu", 1))
    return max(1, math.ceil(cpu)) if cpu else 1


def gateway_resources(spec: dict) -> dict:
    """``gateway.resources`` as given; without it, one core per worker (requested
    and limited alike, so the HPA's CPU utilization is per worker) and memory
    for each worker's copy of the embedder and index."""
    if resources := spec["gateway"].get("resources"):
        return resources
    workers = gateway_workers(spec)
    return {
        "requests": {"cpu": str(workers), "memory": f"{1 + workers}Gi"},
        "limits": {"cpu": str(workers), "memory": f"{2 * (1 + workers)}Gi"},
    }


def gateway_deployment(body: dict, spec: dict) -> dict:
    gateway = spec["gateway"]
    name = resource_name(body, "gateway")
    config_hash = _hash(gateway_config(body, spec))
    resources = gateway_resources(spec)
    workers = gateway_workers(spec)
    volumes = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "index", "persistentVolumeClaim": {"claimName": index_claim_name(body, spec), "readOnly": True}},
        {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts = [
        {"name": "config", "mountPath": "/etc/spotrag/gateway.json", "subPath": "gateway.json", "readOnly": True},
        {"name": "index", "mountPath": INDEX_MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": "/var/cache/spotrag"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if secret := gateway.get("apiKeySecret"):
        # Mounted as files (not env) so a rotated Secret reaches running pods.
        volumes.append({"name": "api-keys", "secret": {"secretName": secret}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    labels = common_labels(body, "gateway")
    deployment_spec: dict[str, Any] = {}
    if not gateway.get("autoscaling"):
        deployment_spec["replicas"] = gateway["replicas"]  # else the HorizontalPodAutoscaler's to set
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, name, "gateway"),
        "spec": {
            **deployment_spec,
            "selector": {"matchLabels": gateway_selector(body)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new config rolls the gateways (a subPath mount never updates in place).
                    "annotations": {
                        "spotrag.io/config-hash": config_hash,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(GATEWAY_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": GATEWAY_GRACE_SECONDS,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "topology.kubernetes.io/zone",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": gateway_selector(body)},
                        }
                    ],
                    "containers": [
                        {
                            "name": "gateway",
                            "image": gateway["image"],
                            "command": [
                                "spotrag",
                                "gateway",
                                "--config",
                                GATEWAY_CONFIG_PATH,
                                "--host",
                                "0.0.0.0",
                                "--port",
                                str(GATEWAY_PORT),
                                "--workers",
                                str(workers),
                            ],
                            "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(GATEWAY_PRESTOP_SECONDS)]}}},
                            "env": [
                                {"name": "HF_HOME", "value": "/var/cache/spotrag"},
                                {"name": "OMP_NUM_THREADS", "value": "1"},
                            ],
                            "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
                            "resources": resources,
                            "volumeMounts": mounts,
                            "startupProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 5,
                                "failureThreshold": 60,
                            },
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def gateway_service(body: dict, spec: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, resource_name(body), "gateway"),
        "spec": {
            "type": spec["gateway"]["serviceType"],
            "selector": gateway_selector(body),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def gateway_pdb(body: dict) -> dict:
    """One gateway at a time may be evicted (a node drain waits for the next);
    one that is not Ready may always go, so a broken rollout never blocks a
    drain. (Rollouts themselves are paced by maxUnavailable 0 / maxSurge 1.)"""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(body, resource_name(body, "gateway"), "gateway"),
        "spec": {
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": gateway_selector(body)},
        },
    }


# The gateway's gauge of requests admitted or waiting; an HPA target per pod
# through a custom-metrics adapter (e.g. prometheus-adapter) exposing it.
GATEWAY_INFLIGHT_METRIC = "spotrag_inflight_requests"


def gateway_hpa(body: dict, spec: dict) -> dict | None:
    """An autoscaling/v2 HorizontalPodAutoscaler for the gateway Deployment when
    ``gateway.autoscaling`` is set: on CPU utilization (of the request, one core
    per worker), and on in-flight requests per pod if a target is given. Scale-in
    takes one pod a minute, each draining its streams (preStop, then the
    gateway's shutdown grace) before it goes."""
    scaling = spec["gateway"].get("autoscaling")
    if not scaling:
        return None
    metrics: list[dict] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling["targetCPUUtilization"]},
            },
        }
    ]
    if streams := scaling.get("targetInflightRequestsPerPod"):
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": GATEWAY_INFLIGHT_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(streams)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(body, resource_name(body, "gateway"), "gateway"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": resource_name(body, "gateway")},
            "minReplicas": scaling["minReplicas"],
            "maxReplicas": scaling["maxReplicas"],
            "metrics": metrics,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


# Index -------------------------------------------------------------------


def index_claim_name(body: dict, spec: dict) -> str:
    return spec["retrieval"]["index"].get("persistentVolumeClaim") or resource_name(body, "index")


def index_claim(body: dict, spec: dict) -> dict | None:
    """The claim the index lives on, unless the user brought their own."""
    index = spec["retrieval"]["index"]
    if index.get("persistentVolumeClaim"):
        return None
    claim_spec: dict[str, Any] = {
        # Written by the index Job, read by every gateway at once.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": index["size"]}},
    }
    if index.get("storageClassName"):
        claim_spec["storageClassName"] = index["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(body, resource_name(body, "index"), "index"),
        "spec": claim_spec,
    }


def endpoint_url(body: dict) -> str:
    return f"http://{resource_name(body)}.{body['metadata']['namespace']}.svc/v1"


def static_children(body: dict, spec: dict) -> list[dict]:
    """Everything the RAGDeployment owns except engine pods and index Jobs,
    which the operator creates and deletes one by one."""
    children = [
        engines_service(body),
        gateway_configmap(body, spec),
        gateway_service_account(body),
        gateway_role(body),
        gateway_role_binding(body),
        gateway_deployment(body, spec),
        gateway_service(body, spec),
        gateway_pdb(body),
    ]
    if hpa := gateway_hpa(body, spec):
        children.append(hpa)
    if claim := index_claim(body, spec):
        children.insert(0, claim)
    return children


CORPUS_MOUNT = "/var/lib/spotrag/corpus"
INDEX_RESULT_PATH = "/dev/termination-log"


def corpus_hash(spec: dict, corpus_content: str = "") -> str:
    """What, when changed, needs a new index: the corpus source and its
    content (for a ConfigMap), the embedding model and prefixes, chunking."""
    retrieval = spec["retrieval"]
    return _hash(
        {
            "corpus": retrieval.get("corpus"),
            "content": corpus_content,
            "model": retrieval["embeddingModel"],
            "prefixes": [retrieval["queryPrefix"], retrieval["passagePrefix"]],
        }
    )


def index_job_name(body: dict, corpus_digest: str) -> str:
    return resource_name(body, f"index-{corpus_digest[:8]}")


def index_job(body: dict, spec: dict, corpus_digest: str) -> dict:
    """The Job that turns the corpus into a new index version on the claim.

    The builder writes into a fresh version folder and switches CURRENT last,
    so gateways never read a half-written index; its result (version,
    passages) comes back in the termination message, where the operator
    reads it without mounting anything.
    """
    retrieval = spec["retrieval"]
    corpus = retrieval["corpus"]
    gateway = spec["gateway"]
    volumes: list[dict] = [
        {"name": "index", "persistentVolumeClaim": {"claimName": index_claim_name(body, spec)}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": "index", "mountPath": INDEX_MOUNT},
        {"name": "cache", "mountPath": "/var/cache/spotrag"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    source = CORPUS_MOUNT
    if corpus.get("configMap"):
        volumes.append({"name": "corpus", "configMap": {"name": corpus["configMap"]}})
        mounts.append({"name": "corpus", "mountPath": CORPUS_MOUNT, "readOnly": True})
    elif corpus.get("persistentVolumeClaim"):
        claim = corpus["persistentVolumeClaim"]
        volumes.append({"name": "corpus", "persistentVolumeClaim": {"claimName": claim["name"], "readOnly": True}})
        mounts.append({"name": "corpus", "mountPath": CORPUS_MOUNT, "readOnly": True})
        source = f"{CORPUS_MOUNT}/{claim['path'].strip('/')}".rstrip("/")
    command = [
        "spotrag",
        "index",
        "build",
        source,
        "--out",
        INDEX_MOUNT,
        "--model",
        retrieval["embeddingModel"],
        "--query-prefix",
        retrieval["queryPrefix"],
        "--passage-prefix",
        retrieval["passagePrefix"],
        "--chunk-tokens",
        str(corpus["chunkTokens"]),
        "--overlap",
        str(corpus["chunkOverlap"]),
        # Embeddings are checkpointed here, so a retried Pod resumes.
        "--work-dir",
        f"{INDEX_MOUNT}/.work-{corpus_digest[:8]}",
        "--result-file",
        INDEX_RESULT_PATH,
    ]
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    tolerations: list[dict] = []
    image = gateway["image"]
    if corpus["gpu"]:
        gpu = spec["gpu"]["resourceName"]
        resources["requests"][gpu] = "1"
        resources["limits"][gpu] = "1"
        tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
        image = image.replace("/runtime:", "/runtime-cuda:")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(body, index_job_name(body, corpus_digest), "index")
        | {"annotations": {"spotrag.io/corpus-hash": corpus_digest}},
        "spec": {
            "backoffLimit": 4,
            "template": {
                "metadata": {"labels": common_labels(body, "index")},
                "spec": {
                    "restartPolicy": "Never",
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "tolerations": tolerations,
                    "containers": [
                        {
                            "name": "index",
                            "image": image,
                            "command": command,
                            "env": [{"name": "HF_HOME", "value": "/var/cache/spotrag"}],
                            "resources": resources,
                            "volumeMounts": mounts,
                            "terminationMessagePath": INDEX_RESULT_PATH,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


# Engine groups: one engine over several nodes ------------------------------

# The upstream LeaderWorkerSet API (kubernetes-sigs/lws) and the labels and
# environment its controller gives every pod of a group.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_SIZE_ANNOTATION = "leaderworkerset.sigs.k8s.io/size"
LWS_GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"
LWS_LEADER_ADDRESS_ENV = "LWS_LEADER_ADDRESS"
LWS_WORKER_INDEX_ENV = "LWS_WORKER_INDEX"
COMPONENT_WORKER = "engine-worker"
# vLLM's torch.distributed rendezvous on the leader (--master-port).
MASTER_PORT = 29500


def nodes_per_engine(spec: dict) -> int:
    return spec["gpu"].get("nodesPerEngine") or 1


def group_args(spec: dict, rank: str) -> list[str]:
    """vLLM's multi-node flags (multiprocessing backend, no Ray): pipeline
    parallel across the group's nodes, tensor parallel inside each; every
    node runs `vllm serve` with its rank, the workers without an API server
    (--headless). $(VAR) is expanded by the kubelet from the env LWS sets."""
    nodes = nodes_per_engine(spec)
    args = [
        "--pipeline-parallel-size",
        str(nodes),
        "--distributed-executor-backend",
        "mp",
        "--nnodes",
        str(nodes),
        "--node-rank",
        rank,
        "--master-addr",
        f"$({LWS_LEADER_ADDRESS_ENV})",
        "--master-port",
        str(MASTER_PORT),
    ]
    return args if rank == "0" else [*args, "--headless"]


def engine_group(body: dict, spec: dict, capacity: str) -> dict:
    """One engine over `gpu.nodesPerEngine` nodes: a LeaderWorkerSet of one
    group (replicas 1), so the operator still decides per engine which goes on
    scale-in and when, as it does for single-node engine pods.

    The leader is the engine pod as `engine_pod` renders it (the one the
    gateways see: it alone carries the serving label the engines Service
    selects); the workers run the same `vllm serve` headless. A pod lost
    restarts the whole group (RecreateGroupOnPodRestart): a pipeline stage
    cannot be replaced on its own. Workers follow the group's capacity type,
    unless gpu.mixedCapacityGroups lets a spot group's workers use on-demand
    nodes too.
    """
    leader = engine_pod(body, spec, capacity)
    leader_spec = leader["spec"]
    leader_container = leader_spec["containers"][0]
    base_args = list(leader_container["args"])
    leader_container["args"] = base_args + group_args(spec, "0")
    leader_container["ports"].append({"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"})

    worker_spec = copy.deepcopy(leader_spec)
    worker = worker_spec["containers"][0]
    worker["args"] = base_args + group_args(spec, f"$({LWS_WORKER_INDEX_ENV})")
    worker["ports"] = []
    # No API server on a worker: it is alive while its process is; the group's
    # readiness is the leader's, whose /health answers once every stage joined.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        worker.pop(probe, None)
    worker.pop("lifecycle", None)
    if spec["gpu"]["mixedCapacityGroups"] and capacity == SPOT:
        worker_spec["affinity"] = _engine_affinity(spec, SPOT)
        terms = worker_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        terms["nodeSelectorTerms"] += _engine_affinity(spec, ON_DEMAND)["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
    # One node per pod of a group: a pipeline stage per node, whatever the node's size
    # (matchLabelKeys: the pods of the same group, by the group key LWS gives them).
    apart = {
        "labelSelector": {"matchLabels": {LABEL_DEPLOYMENT: body["metadata"]["name"]}},
        "matchLabelKeys": [LWS_GROUP_KEY_LABEL],
        "topologyKey": "kubernetes.io/hostname",
    }
    for pod_spec in (leader_spec, worker_spec):
        pod_spec["affinity"]["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [apart]}
    leader_labels = leader["metadata"]["labels"]
    worker_labels = common_labels(body, COMPONENT_WORKER) | {
        LABEL_CAPACITY: capacity,
        LABEL_SPEC_HASH: leader_labels[LABEL_SPEC_HASH],
    }
    annotations = dict(leader["metadata"]["annotations"]) | {"spotrag.io/nodes": str(nodes_per_engine(spec))}
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": {
            "generateName": resource_name(body, "engine-"),
            "namespace": body["metadata"]["namespace"],
            # The group's record: capacity, serving and the drain annotations live here,
            # so a drain survives the group being recreated.
            "labels": dict(leader_labels),
            "annotations": annotations,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {"maxUnavailable": 1}},
            "leaderWorkerTemplate": {
                "size": nodes_per_engine(spec),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {
                    "metadata": {"labels": dict(leader_labels), "annotations": dict(annotations)},
                    "spec": leader_spec,
                },
                "workerTemplate": {
                    "metadata": {"labels": worker_labels, "annotations": dict(annotations)},
                    "spec": worker_spec,
                },
            },
        },
    }


def engine_pod_affinity(spec: dict, capacity: str) -> dict:
    """The node affinity of an engine pod of `capacity` (for judging nodes)."""
    return _engine_affinity(spec, capacity)


def engine_unit(body: dict, spec: dict, capacity: str) -> dict:
    """What the operator creates for one engine: a pod, or a group over nodes."""
    if nodes_per_engine(spec) > 1:
        return engine_group(body, spec, capacity)
    return engine_pod(body, spec, capacity)
