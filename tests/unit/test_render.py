"""What the operator renders from a RAGDeployment, field by field."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from spotrag_operator import render
from spotrag_operator.checks import find_problems
from spotrag_operator.crd import defaulted_spec

from .operator_fixtures import ragdeployment


def rendered(spec_overrides: dict | None = None) -> tuple[dict, dict]:
    body = ragdeployment(spec_overrides)
    return body, defaulted_spec(body)


def container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


def test_engine_pod_runs_upstream_vllm_with_flags_from_the_spec():
    body, spec = rendered(
        {
            "model": {
                "tensorParallelSize": 2,
                "quantization": "awq",
                "enablePrefixCaching": False,
                "speculative": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "numSpeculativeTokens": 4},
                "loraAdapters": [{"name": "sql", "source": "org/sql-lora"}],
                "extraArgs": ["--max-num-seqs=64"],
                "shutdownTimeoutSeconds": 45,
            }
        }
    )
    pod = render.engine_pod(body, spec, render.SPOT)
    vllm = container(pod)
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    assert args[0] == "Qwen/Qwen2.5-7B-Instruct"

    def flag(name: str) -> str:
        return args[args.index(name) + 1]

    assert flag("--served-model-name") == "qwen2.5-7b"
    assert flag("--tensor-parallel-size") == "2"
    assert flag("--gpu-memory-utilization") == "0.9"
    assert flag("--max-model-len") == "8192"
    assert flag("--quantization") == "awq"
    assert flag("--shutdown-timeout") == "45"
    assert "--no-enable-prefix-caching" in args
    assert json.loads(flag("--speculative-config")) == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "num_speculative_tokens": 4,
    }
    assert flag("--lora-modules") == "sql=org/sql-lora" and "--enable-lora" in args
    assert args[-1] == "--max-num-seqs=64"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_engine_pod_lifecycle_grace_covers_prestop_and_vllm_shutdown():
    body, spec = rendered({"model": {"shutdownTimeoutSeconds": 100}, "interruption": {"preStopSeconds": 7}})
    pod = render.engine_pod(body, spec, render.ON_DEMAND)
    vllm = container(pod)
    assert vllm["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 7 + 100
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
    assert (
        vllm["startupProbe"]["periodSeconds"] * vllm["startupProbe"]["failureThreshold"] >= 600
    )  # minutes of model loading
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_engine_pod_labels_and_owner():
    body, spec = rendered()
    pod = render.engine_pod(body, spec, render.SPOT)
    labels = pod["metadata"]["labels"]
    assert labels[render.LABEL_DEPLOYMENT] == "handbook"
    assert labels[render.LABEL_CAPACITY] == "spot"
    assert labels[render.LABEL_SERVING] == "true"
    assert labels[render.LABEL_SPEC_HASH] == render.engine_spec_hash(spec)
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "RAGDeployment",
        "handbook",
        "8f0e-uid",
        True,
    )


@pytest.mark.parametrize("capacity", [render.SPOT, render.ON_DEMAND])
def test_engine_affinity_matches_each_clouds_capacity_labels(capacity):
    body, spec = rendered({"gpu": {"products": ["NVIDIA-L4"], "instanceTypes": ["g6.xlarge"]}})
    pod = render.engine_pod(body, spec, capacity)
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    keys = {expr["key"] for term in terms for expr in term["matchExpressions"]}
    for label in (
        "karpenter.sh/capacity-type",
        "eks.amazonaws.com/capacityType",
        "cloud.google.com/gke-spot",
        "kubernetes.azure.com/scalesetpriority",
        render.LABEL_CAPACITY,
    ):
        assert label in keys
    for term in terms:  # the GPU narrowing applies whichever convention matches
        exprs = term["matchExpressions"]
        assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]} in exprs
        assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["g6.xlarge"]} in exprs
    spot_tolerated = any(t.get("key") == "cloud.google.com/gke-spot" for t in pod["spec"]["tolerations"])
    assert spot_tolerated == (capacity == render.SPOT)


def test_on_demand_terms_never_match_a_spot_node():
    """A node matching any on-demand term must not carry a spot label of the same cloud."""
    spot_nodes = [
        {"karpenter.sh/capacity-type": "spot"},
        {"eks.amazonaws.com/capacityType": "SPOT"},
        {"cloud.google.com/gke-nodepool": "l4-spot", "cloud.google.com/gke-spot": "true"},
        {"kubernetes.azure.com/agentpool": "gpuspot", "kubernetes.azure.com/scalesetpriority": "spot"},
        {render.LABEL_CAPACITY: "spot"},
    ]
    for labels in spot_nodes:
        assert not any(_term_matches(term, labels) for term in render.CAPACITY_NODE_TERMS[render.ON_DEMAND]), labels
        assert any(_term_matches(term, labels) for term in render.CAPACITY_NODE_TERMS[render.SPOT]), labels
    gke_on_demand = {"cloud.google.com/gke-nodepool": "l4"}
    assert any(_term_matches(term, gke_on_demand) for term in render.CAPACITY_NODE_TERMS[render.ON_DEMAND])


def _term_matches(term: list[dict], labels: dict) -> bool:
    for expr in term:
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def test_model_sources_map_to_vllm_arguments():
    body, spec = rendered({"model": {"name": "pvc://models/qwen/7b"}})
    pod = render.engine_pod(body, spec, render.SPOT)
    assert container(pod)["args"][0] == "/models/qwen/7b"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["spec"][
        "volumes"
    ]
    body, spec = rendered({"model": {"name": "s3://bucket/qwen"}})
    args = container(render.engine_pod(body, spec, render.SPOT))["args"]
    assert args[0] == "s3://bucket/qwen" and args[args.index("--load-format") + 1] == "runai_streamer"


def test_engines_service_selects_only_serving_engines():
    body, _ = rendered()
    service = render.engines_service(body)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {
        render.LABEL_DEPLOYMENT: "handbook",
        render.LABEL_COMPONENT: "engine",
        render.LABEL_SERVING: "true",
    }


def test_gateway_config_carries_retrieval_prompt_and_discovery():
    body, spec = rendered(
        {
            "retrieval": {"queryPrefix": "query: ", "passagePrefix": "passage: ", "topK": 6},
            "gateway": {"apiKeySecret": "keys"},
        }
    )
    config = json.loads(render.gateway_configmap(body, spec)["data"]["gateway.json"])
    assert config["servedModelName"] == "qwen2.5-7b"
    assert config["retrieval"]["queryPrefix"] == "query: " and config["retrieval"]["passagePrefix"] == "passage: "
    assert config["retrieval"]["topK"] == 6
    assert "{contexts}" in config["prompt"]["template"] and "{question}" in config["prompt"]["template"]
    assert config["engines"] == {
        "discovery": "endpointslices",
        "service": "handbook-engines",
        "namespace": "default",
        "port": 8000,
    }
    assert config["auth"]["apiKeysDir"] == render.API_KEYS_DIR


def test_gateway_config_is_accepted_by_the_gateway():
    from spotrag_runtime.gateway.config import GatewayConfig

    body, spec = rendered({"gateway": {"apiKeySecret": "keys"}})
    config = GatewayConfig.from_mapping(render.gateway_config(body, spec))
    assert config.served_model_name == "qwen2.5-7b"


def test_gateway_deployment_rolls_on_config_change_and_mounts_keys():
    body, spec = rendered({"gateway": {"apiKeySecret": "keys", "replicas": 3}})
    deployment = render.gateway_deployment(body, spec)
    template = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 3
    assert {"name": "api-keys", "secret": {"secretName": "keys"}} in template["spec"]["volumes"]
    other_body, other_spec = rendered({"gateway": {"apiKeySecret": "keys", "replicas": 3}, "retrieval": {"topK": 9}})
    other = render.gateway_deployment(other_body, other_spec)["spec"]["template"]["metadata"]["annotations"]
    assert other["spotrag.io/config-hash"] != template["metadata"]["annotations"]["spotrag.io/config-hash"]
    gateway = template["spec"]["containers"][0]
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_gateway_workers_and_cpu_go_together():
    def pod(gateway: dict) -> tuple[list[str], dict]:
        body, spec = rendered({"gateway": gateway})
        gateway_container = container(render.gateway_deployment(body, spec)["spec"]["template"])
        return gateway_container["command"], gateway_container["resources"]

    command, resources = pod({"workers": 4})
    assert command[command.index("--workers") + 1] == "4"
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "4"  # a core per worker
    assert pod({})[0][pod({})[0].index("--workers") + 1] == "1"
    for cpu, workers in (("3", "3"), ("1500m", "2"), (2, "2"), ("250m", "1")):
        command, resources = pod({"resources": {"requests": {"cpu": cpu}}})
        assert command[command.index("--workers") + 1] == workers, cpu
        assert resources == {"requests": {"cpu": cpu}}  # given resources are kept as given


def test_gateway_autoscaling_renders_an_hpa_that_owns_the_replicas():
    body, spec = rendered({"gateway": {"replicas": 3}})
    assert render.gateway_hpa(body, spec) is None
    assert "HorizontalPodAutoscaler" not in [c["kind"] for c in render.static_children(body, spec)]
    assert render.gateway_deployment(body, spec)["spec"]["replicas"] == 3

    body, spec = rendered({"gateway": {"replicas": 3, "autoscaling": {"maxReplicas": 10}}})
    hpa = render.gateway_hpa(body, spec)
    assert hpa in render.static_children(body, spec)
    deployment = render.gateway_deployment(body, spec)
    assert "replicas" not in deployment["spec"]  # the HPA's to set; the operator never writes it back
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    ]
    # Scale-in one pod at a time: each drains its streams before it goes.
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]

    body, spec = rendered({"gateway": {"autoscaling": {"maxReplicas": 4, "targetInflightRequestsPerPod": 300}}})
    inflight = render.gateway_hpa(body, spec)["spec"]["metrics"][1]
    assert inflight["pods"]["metric"] == {"name": "spotrag_inflight_requests"}
    assert inflight["pods"]["target"] == {"type": "AverageValue", "averageValue": "300"}


def test_a_gateway_leaving_drains_its_streams_and_a_pdb_lets_rollouts_and_drains_proceed():
    from spotrag_runtime.gateway.cli import SHUTDOWN_GRACE_SECONDS

    body, spec = rendered()
    pod_spec = render.gateway_deployment(body, spec)["spec"]["template"]["spec"]
    pre_stop = int(container({"spec": pod_spec})["lifecycle"]["preStop"]["exec"]["command"][-1])
    # The endpoint leaves the Service first, then the gateway finishes its answers in flight.
    assert pod_spec["terminationGracePeriodSeconds"] > pre_stop + SHUTDOWN_GRACE_SECONDS
    assert render.GATEWAY_SHUTDOWN_GRACE_SECONDS == SHUTDOWN_GRACE_SECONDS
    pdb = render.gateway_pdb(body)["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_spec_hash_changes_with_the_engine_spec_only():
    body, spec = rendered()
    scaled = defaulted_spec(ragdeployment({"scaling": {"minReplicas": 3}}))
    new_model = defaulted_spec(ragdeployment({"model": {"maxModelLen": 4096}}))
    assert render.engine_spec_hash(spec) == render.engine_spec_hash(scaled)
    assert render.engine_spec_hash(spec) != render.engine_spec_hash(new_model)


def test_every_child_has_an_owner_reference():
    body, spec = rendered()
    for child in render.static_children(body, spec) + [render.engine_pod(body, spec, render.SPOT)]:
        assert child["metadata"]["ownerReferences"][0]["uid"] == "8f0e-uid", child["kind"]


def test_existing_index_claim_is_used_not_created():
    body, spec = rendered({"retrieval": {"index": {"persistentVolumeClaim": "shared-index"}}})
    kinds = [c["kind"] for c in render.static_children(body, spec)]
    assert "PersistentVolumeClaim" not in kinds
    volumes = render.gateway_deployment(body, spec)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "index", "persistentVolumeClaim": {"claimName": "shared-index", "readOnly": True}} in volumes


KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_generated_objects_validate_strictly(version):
    full = {
        "model": {
            "hfTokenSecret": {"name": "hf"},
            "speculative": {"model": "ngram"},
            "loraAdapters": [{"name": "a", "source": "b"}],
            "resources": {"requests": {"memory": "32Gi"}},
            "cache": {"hostPath": "/var/lib/spotrag/models", "minFreeGi": 40},
            "loadFormat": "runai_streamer",
            "standby": {"replicas": 1},
        },
        "gpu": {
            "products": ["NVIDIA-L4"],
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        },
        "gateway": {
            "apiKeySecret": "keys",
            "serviceType": "LoadBalancer",
            "workers": 3,
            "autoscaling": {"minReplicas": 2, "maxReplicas": 8, "targetInflightRequestsPerPod": 200},
        },
        "retrieval": {"index": {"storageClassName": "efs"}},
    }
    for overrides in ({}, full):
        body, spec = rendered(overrides)
        objects = render.static_children(body, spec) + [render.engine_pod(body, spec, c) for c in render.CAPACITY_TYPES]
        objects.append(render.index_job(body, spec, render.corpus_hash(spec)))
        for obj in objects:
            # kubernetes-validate wants a name; the API server fills generateName's.
            obj = json.loads(json.dumps(obj))
            obj["metadata"].setdefault("name", obj["metadata"].get("generateName", "x") + "abcde")
            kubernetes_validate.validate(obj, version, strict=True)


def test_index_job_builds_the_corpus_onto_the_claim():
    body, spec = rendered(
        {
            "retrieval": {
                "queryPrefix": "query: ",
                "passagePrefix": "passage: ",
                "corpus": {"configMap": "handbook-docs", "chunkTokens": 128, "gpu": True},
            }
        }
    )
    digest = render.corpus_hash(spec, "content")
    job = render.index_job(body, spec, digest)
    assert job["metadata"]["name"] == f"handbook-index-{digest[:8]}"
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:4] == ["spotrag", "index", "build", render.CORPUS_MOUNT]
    assert command[command.index("--query-prefix") + 1] == "query: "
    assert command[command.index("--chunk-tokens") + 1] == "128"
    assert command[command.index("--out") + 1] == render.INDEX_MOUNT
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "corpus", "configMap": {"name": "handbook-docs"}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never"
    assert render.corpus_hash(spec, "content") != render.corpus_hash(spec, "other content")


@pytest.mark.parametrize(
    ("model", "load_format", "sleep_mode"),
    [
        ({"name": "Qwen/Qwen2.5-7B-Instruct"}, None, False),
        ({"name": "s3://bucket/qwen"}, "runai_streamer", False),  # the streamer is how vLLM reads s3
        ({"name": "s3://bucket/qwen", "loadFormat": "runai_streamer_sharded"}, "runai_streamer_sharded", False),
        ({"name": "Qwen/Qwen2.5-7B-Instruct", "loadFormat": "runai_streamer"}, "runai_streamer", False),
        ({"name": "Qwen/Qwen2.5-7B-Instruct", "loadFormat": "auto"}, None, False),
        ({"name": "Qwen/Qwen2.5-7B-Instruct", "standby": {"replicas": 2}}, None, True),
        ({"name": "Qwen/Qwen2.5-7B-Instruct", "standby": {"replicas": 0}}, None, False),
    ],
    ids=["hf", "s3-default", "s3-chosen", "hf-streamed", "auto", "standby", "standby-off"],
)
def test_fast_loading_renders_upstream_flags_only(model, load_format, sleep_mode):
    body, spec = rendered({"model": model})
    pod = render.engine_pod(body, spec, render.SPOT)
    args, env = container(pod)["args"], {e["name"]: e.get("value") for e in container(pod)["env"]}
    assert (args[args.index("--load-format") + 1] if "--load-format" in args else None) == load_format
    assert ("--enable-sleep-mode" in args) is sleep_mode
    assert (env.get("VLLM_SERVER_DEV_MODE") == "1") is sleep_mode  # /sleep and /wake_up need it
    assert pod["spec"]["containers"][0]["command"] == ["vllm", "serve"]


def test_a_node_model_cache_is_a_hostpath_the_engine_reaches_through_a_link_its_init_container_sets():
    body, spec = rendered({"model": {"cache": {"hostPath": "/var/lib/spotrag/models", "minFreeGi": 40}}})
    pod = render.engine_pod(body, spec, render.SPOT)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["node-model-cache"]["hostPath"] == {"path": "/var/lib/spotrag/models", "type": "DirectoryOrCreate"}
    assert "emptyDir" in volumes["model-cache"]  # the pod's own, for when the node's is unusable
    env = {e["name"]: e.get("value") for e in container(pod)["env"]}
    assert env["HF_HOME"] == f"{render.CACHE_LINK}/huggingface"
    assert env["VLLM_CACHE_ROOT"] == f"{render.CACHE_LINK}/vllm"  # torch.compile's cache: 148 s → 110 s
    [init] = pod["spec"]["initContainers"]
    assert init["name"] == render.CACHE_INIT_CONTAINER and init["command"][:3] == ["spotrag", "model-cache", "prepare"]
    assert init["command"][init["command"].index("--min-free-gi") + 1] == "40"
    mounted = {m["mountPath"] for m in container(pod)["volumeMounts"]}
    assert {render.NODE_CACHE_MOUNT, render.POD_CACHE_MOUNT, render.CACHE_LINK_MOUNT} <= mounted
    plain_body, plain_spec = rendered()
    plain = render.engine_pod(plain_body, plain_spec, render.SPOT)
    assert "initContainers" not in plain["spec"]
    assert render.engine_spec_hash(plain_spec) != render.engine_spec_hash(spec)  # a cache rolls the engines


NEURON_SPEC = {
    "model": {
        "name": "meta-llama/Llama-3.1-70B-Instruct",
        "image": "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:0.16.0-neuronx-py311-sdk2.29.0-ubuntu22.04",
        "tensorParallelSize": 24,
        "speculative": {"model": "meta-llama/Llama-3.1-8B-Instruct"},
    },
    "gpu": {"resourceName": "aws.amazon.com/neuroncore", "instanceTypes": ["inf2.48xlarge"]},
}


def test_neuron_engine_asks_the_neuron_device_plugin_and_tolerates_its_taint():
    body, spec = rendered(NEURON_SPEC)
    pod = render.engine_pod(body, spec, render.SPOT)
    vllm = container(pod)
    assert vllm["command"] == ["vllm", "serve"] and vllm["image"].startswith("public.ecr.aws/neuron/")
    assert vllm["resources"]["limits"]["aws.amazon.com/neuroncore"] == "24"
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]
    args = vllm["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "24"
    assert "--gpu-memory-utilization" not in args  # vLLM on Neuron sizes its KV cache from the Neuron config
    assert "--speculative-config" in args
    keys = {t["key"] for t in pod["spec"]["tolerations"]}
    assert {"aws.amazon.com/neuroncore", "aws.amazon.com/neuron"} <= keys
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["NEURON_COMPILE_CACHE_URL"].startswith(render.MODEL_CACHE_MOUNT)
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert all(
        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["inf2.48xlarge"]}
        in t["matchExpressions"]
        for t in terms
    )


def test_gpu_engines_keep_their_flags_and_no_neuron_toleration():
    body, spec = rendered()
    pod = render.engine_pod(body, spec, render.ON_DEMAND)
    assert "--gpu-memory-utilization" in container(pod)["args"]
    assert "aws.amazon.com/neuron" not in {t["key"] for t in pod["spec"]["tolerations"]}


def test_on_neuron_the_node_cache_keeps_the_compiler_cache_and_a_standby_is_refused():
    overrides = {**NEURON_SPEC, "model": {**NEURON_SPEC["model"], "cache": {"hostPath": "/var/lib/spotrag/models"}}}
    body, spec = rendered(overrides)
    env = {e["name"]: e.get("value") for e in container(render.engine_pod(body, spec, render.SPOT))["env"]}
    assert env["NEURON_COMPILE_CACHE_URL"] == f"{render.CACHE_LINK}/neuron-compile-cache"
    assert list(env).count("NEURON_COMPILE_CACHE_URL") == 1
    overrides["model"]["standby"] = {"replicas": 1}
    body, spec = rendered(overrides)
    assert render.standby_replicas(spec) == 0
    assert "--enable-sleep-mode" not in container(render.engine_pod(body, spec, render.SPOT))["args"]
    assert any("model.standby needs vLLM's sleep mode" in p for p in find_problems(spec, "default", {}))
