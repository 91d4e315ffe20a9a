"""The simulated cluster profile: GPUs, model, engine throughput, prices, spot behaviour, timing.

An engine's speed comes from a roofline model of vLLM on one GPU, set from
the GPU's datasheet and the model's shape, with efficiencies taken from
published vLLM measurements:

- Decode is memory-bound: each step reads the weights once, plus the KV cache
  of every running sequence. vLLM reaches 77% of the memory-bandwidth ceiling
  (Llama-3.1-8B-Instruct BF16 on one A100 40GB, vLLM 0.23: ~75 tokens/s for a
  single stream; johnmusgrave.com/p/vllm-throughput-latency-sweep-on). The
  same model then predicts ~1,200 output tokens/s for Mistral-7B at 32
  concurrent 256→128 requests on an RTX 4090, where 975 were measured with
  vLLM (mushfiqrahman.dev/?p=1668): within 25%, on the optimistic side.
- Prefill is compute-bound: 2 FLOPs per parameter per token at 50% of the
  dense BF16 tensor peak (an assumption; chunked prefill with 2048-token
  steps, vLLM's default budget, rarely does better on these GPUs).
- KV cache: what is left of `gpuMemoryUtilization` (0.9) of the GPU's memory
  after the weights and ~1.5 GB of activations and CUDA graphs.

Measured presets replace the roofline where the project has numbers
(`MEASURED`): H200 + Llama-3.1-8B from vLLM 0.26.0 on an H200, a sweep of 3
repeats (bench/vllm/capacity.json, docs/benchmarks.md): prefill ~40,000
tok/s (37,664-41,004 by prompt length), a lone stream 206 tok/s, 64 streams
9,545 tok/s (the step model is fitted to these two), KV cache 896,912
tokens, `max_num_batched_tokens` 8192 (vLLM's default on a GPU of >= 70 GiB,
in the observed logs), start to /health 110-148 s (130 s used). The model
then gives ~18,000 tok/s for 256 streams in pure decode, where the README's
10,850 tok/s at 256 includes a 2.5 s median TTFT of the whole batch
arriving at once: not a like-for-like point.

Prices are AWS us-east-1 on-demand list prices per GPU-hour; spot is taken
as 40% of on-demand, an assumption (spot prices move by region and hour: put
yours in `pricing`). The H200's price is an assumption too (p5en.48xlarge / 8,
not checked against a price list here); ratios between policies do not depend
on it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from spotrag_operator.autoscale import InvalidScalingPolicy, ScalingPolicy
from spotrag_operator.crd import defaulted_spec
from spotrag_operator.placement import SpotSettings

BANDWIDTH_EFFICIENCY = 0.77
PREFILL_COMPUTE_EFFICIENCY = 0.5
GPU_MEMORY_UTILIZATION = 0.9
RUNTIME_OVERHEAD_BYTES = 1.5e9
SPOT_PRICE_FRACTION = 0.4


class ProfileError(ValueError):
    """A profile with impossible or unknown settings; refused before anything runs."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    bf16_dense_flops: float
    on_demand_per_hour: float  # per GPU
    price_source: str


@dataclass(frozen=True)
class Model:
    name: str
    hf_id: str
    parameters: float
    kv_bytes_per_token: int  # 2 (K, V) x layers x KV heads x head dim x 2 bytes

    @property
    def weight_bytes(self) -> float:
        return self.parameters * 2  # BF16


# Datasheet figures (NVIDIA L4, A100, H100 datasheets): memory, bandwidth,
# dense BF16 tensor throughput (half the "with sparsity" number).
GPUS = {
    g.name: g
    for g in (
        Gpu("L4", 24e9, 300e9, 121e12, 0.8048, "g6.xlarge"),
        Gpu("A100-40GB", 40e9, 1555e9, 312e12, 32.7726 / 8, "p4d.24xlarge / 8"),
        Gpu("A100-80GB", 80e9, 2039e9, 312e12, 40.9657 / 8, "p4de.24xlarge / 8"),
        Gpu("H100", 80e9, 3350e9, 989e12, 55.04 / 8, "p5.48xlarge / 8 (after the 2025 price cut)"),
        Gpu("H200", 141e9, 4800e9, 989e12, 63.296 / 8, "p5en.48xlarge / 8 (an assumption, see above)"),
        # AWS Neuron, one engine per whole instance (tensor parallel over all its
        # NeuronCores), so the "GPU" here is the instance: memory, bandwidth and
        # BF16 throughput summed over its chips (AWS's instance pages: inf2.48xlarge
        # 12 Inferentia2, 384 GB, 9.8 TB/s, 2.3 PFLOPS; trn1.32xlarge 16 Trainium,
        # 512 GB, 9.8 TB/s, 3.04 PFLOPS) and the instance's us-east-1 on-demand
        # list price as known when written (verify: $12.98/h and $21.50/h). The
        # roofline's GPU efficiencies are optimistic for a 24- or 32-way
        # tensor-parallel engine; put measured rates in the profile's engine.
        Gpu("inf2.48xlarge", 384e9, 9.8e12, 2.3e15, 12.98127, "inf2.48xlarge on-demand list price (verify)"),
        Gpu("trn1.32xlarge", 512e9, 9.8e12, 3.04e15, 21.50, "trn1.32xlarge on-demand list price (verify)"),
    )
}

# Shapes from each model's config.json.
MODELS = {
    m.name: m
    for m in (
        Model("7b", "mistralai/Mistral-7B-Instruct-v0.3", 7.25e9, 2 * 32 * 8 * 128 * 2),
        Model("8b", "meta-llama/Llama-3.1-8B-Instruct", 8.03e9, 2 * 32 * 8 * 128 * 2),
        Model("13b", "meta-llama/Llama-2-13b-chat-hf", 13.0e9, 2 * 40 * 40 * 128 * 2),
        Model("70b", "meta-llama/Llama-3.1-70B-Instruct", 70.6e9, 2 * 80 * 8 * 128 * 2),
    )
}


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """One vLLM engine's speed: a step costs decode_step + per_token x tokens in the step
    + per_context_token x KV tokens held by the batch."""

    decode_step_seconds: float  # reading the weights once
    seconds_per_token: float  # compute per token processed in a step (prefill or decode)
    seconds_per_context_token: float  # reading the KV cache of a held token
    kv_cache_tokens: int
    max_num_seqs: int = 256  # vLLM's default
    max_num_batched_tokens: int = 2048  # chunked-prefill token budget per step
    max_model_len: int = 8192

    def problems(self) -> list[str]:
        found = []
        if not self.decode_step_seconds > 0:
            found.append("engine decode speed must be positive (a zero or negative decode throughput cannot serve)")
        if not self.seconds_per_token > 0:
            found.append("engine prefill speed must be positive (zero prefill throughput cannot serve)")
        if self.seconds_per_context_token < 0:
            found.append("engine KV read cost must not be negative")
        if self.max_num_seqs < 1:
            found.append("engine.maxNumSeqs must be at least 1")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            found.append(
                f"engine.maxNumBatchedTokens ({self.max_num_batched_tokens}) must exceed maxNumSeqs ({self.max_num_seqs}) so prefill can progress"
            )
        if self.kv_cache_tokens < self.max_model_len:
            found.append(
                f"the KV cache holds {self.kv_cache_tokens} tokens, less than maxModelLen {self.max_model_len}: vLLM would refuse to start"
            )
        return found

    @property
    def prefill_tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token

    @property
    def single_stream_tokens_per_second(self) -> float:
        return 1.0 / (self.decode_step_seconds + self.seconds_per_token)


MEASURED_H200_8B = "vLLM 0.26.0 on H200, 3 repeats, bench/vllm/capacity.json"


@dataclass(frozen=True)
class Measured:
    engine: EngineSpec
    model_load_seconds: float
    source: str


# A step costs d + t·(n + chunk) + c·KV: t from the prefill rate (1/40,000 s);
# d + t + c·256 = 1/206 s (one stream of 128 + 256 tokens); d + 64·t + c·64·256
# = 64/9,545 s (64 such streams) give d and c.
MEASURED = {
    ("H200", "8b"): Measured(
        engine=EngineSpec(
            decode_step_seconds=0.004825,
            seconds_per_token=1 / 40_000,
            seconds_per_context_token=1.71e-8,
            kv_cache_tokens=896_912,
            max_num_batched_tokens=8192,
        ),
        model_load_seconds=145.0,  # to /health 200, weights from local disk, caches cold (bench/vllm/coldstart-disk.json)
        source=MEASURED_H200_8B,
    )
}

# The operator's preset (spotrag_operator.calibration.PRESETS) for each GPU and model.
OPERATOR_PRESETS = {
    ("L4", "7b"): "L4/Mistral-7B",
    ("A100-80GB", "8b"): "A100-80GB/Llama-3.1-8B",
    ("H100", "8b"): "H100/Llama-3.1-8B",
    ("H200", "8b"): "H200/Llama-3.1-8B",
}
# Context the roofline's KV read is averaged at, to give the operator a per-sequence step cost.
PRESET_CONTEXT_TOKENS = 1500


def operator_rates(spec: EngineSpec, context: float = PRESET_CONTEXT_TOKENS) -> dict:
    """The simulated engine as `spec.scaling.calibration` numbers (what a user who measured it would write)."""
    single = 1.0 / (spec.decode_step_seconds + spec.seconds_per_token + spec.seconds_per_context_token * context)
    step64 = spec.decode_step_seconds + 64 * (spec.seconds_per_token + spec.seconds_per_context_token * context)
    return {
        "prefillTokensPerSecond": round(spec.prefill_tokens_per_second, 1),
        "decodeTokensPerSecond": round(single, 3),
        "batchDecodeTokensPerSecond": round(64 / step64, 1),
        "kvCacheTokens": spec.kv_cache_tokens,
    }


def engine_spec_for(gpu: Gpu, model: Model, *, max_model_len: int = 8192) -> EngineSpec:
    measured = MEASURED.get((gpu.name, model.name))
    if measured is not None:
        return dataclasses.replace(measured.engine, max_model_len=max_model_len)
    usable = gpu.memory_bytes * GPU_MEMORY_UTILIZATION - model.weight_bytes - RUNTIME_OVERHEAD_BYTES
    if usable <= 0:
        raise ProfileError(
            f"model {model.name} ({model.hf_id}, {model.weight_bytes / 1e9:.1f} GB of BF16 weights) does not fit on one "
            f"{gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB at {GPU_MEMORY_UTILIZATION:.0%}); pick a larger GPU"
        )
    effective_bandwidth = gpu.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY
    return EngineSpec(
        decode_step_seconds=model.weight_bytes / effective_bandwidth,
        seconds_per_token=2 * model.parameters / (gpu.bf16_dense_flops * PREFILL_COMPUTE_EFFICIENCY),
        seconds_per_context_token=model.kv_bytes_per_token / effective_bandwidth,
        kv_cache_tokens=int(usable // model.kv_bytes_per_token),
        max_model_len=max_model_len,
    )


@dataclass(frozen=True, kw_only=True)
class KubeAISettings:
    """KubeAI's autoscaler (internal/modelautoscaler): every `interval`, the moving
    average of in-flight requests over `time_window` / targetRequests, rounded up;
    a scale-down needs scaleDownDelay / interval consecutive lower answers."""

    target_requests: float | None = None  # None: sized like spotrag's target (run.suggested_targets)
    interval_seconds: float = 10
    time_window_seconds: float = 600  # KubeAI's default
    scale_down_delay_seconds: float = 30  # KubeAI's default


@dataclass(frozen=True, kw_only=True)
class KedaSettings:
    """A KEDA ScaledObject on vLLM's `vllm:num_requests_waiting` (a Prometheus
    trigger, AverageValue = threshold per replica), scaled by the HPA with its
    default behaviour (tolerance 10%, up 4 pods or 100% per 15 s, down after a
    300 s stabilization window)."""

    waiting_threshold: float = 2
    polling_interval_seconds: float = 15
    scale_down_stabilization_seconds: float = 300


@dataclass(frozen=True, kw_only=True)
class Profile:
    gpu: str
    model: str
    engine: EngineSpec
    on_demand_price: float  # per GPU-hour
    spot_price: float
    interruptions_per_hour: float  # per spot node
    notice_seconds: float
    spot_outages: tuple[tuple[float, float], ...] = ()  # (start, end) seconds when no spot can be had
    outages_per_day: float = 0.0  # more outages drawn with the run's seed
    outage_minutes: float = 45.0
    node_start_seconds: float = 120.0  # instance launch to a schedulable GPU node
    model_load_seconds: float = 90.0  # image pull, weights, CUDA graphs: pod to Ready
    slo_ttft_seconds: float = 2.0
    slo_percentile: float = 95.0
    control_interval_seconds: float = 10.0  # the operator's reconcile timer
    termination_grace_seconds: float = 30.0  # Kubernetes' default, for the baselines' pods
    spec: dict = field(default_factory=dict)  # the RAGDeployment spec, CRD defaults filled in
    max_replicas_set: bool = False  # False: the simulator sizes maxReplicas from the trace's peak
    target_set: bool = False  # targetQueuedTokensPerReplica given: spotrag sizes on it rather than the SLO
    utilization_set: bool = False  # False: --utilization sets spotrag's scaling.slo.targetUtilization too
    kubeai: KubeAISettings = KubeAISettings()
    keda: KedaSettings = KedaSettings()

    @property
    def gpus_per_engine(self) -> int:
        return 1

    def with_scaling(self, **fields: float) -> Profile:
        """This profile with some `scaling` fields of the spec replaced (camelCase names)."""
        return dataclasses.replace(self, spec={**self.spec, "scaling": {**self.spec["scaling"], **fields}})

    def scaling_policy(self) -> ScalingPolicy:
        return ScalingPolicy.from_spec(self.spec)

    def spot_settings(self) -> SpotSettings:
        return SpotSettings.from_spec(self.spec)


def build_profile(
    data: dict | None = None, *, gpu: str | None = None, model: str | None = None, source: str = "profile"
) -> Profile:
    """A Profile from a YAML-shaped dict (camelCase keys); --gpu/--model override it."""
    data = dict(data or {})
    _check_keys(
        data,
        {
            "gpu",
            "model",
            "engine",
            "pricing",
            "spot",
            "nodes",
            "slo",
            "controlIntervalSeconds",
            "terminationGracePeriodSeconds",
            "deployment",
            "baselines",
        },
        source,
    )
    gpu_name = gpu or data.get("gpu", "L4")
    model_name = model or data.get("model", "7b")
    if gpu_name not in GPUS:
        raise ProfileError(f"{source}: unknown gpu {gpu_name!r} (known: {', '.join(GPUS)})")
    if model_name not in MODELS:
        raise ProfileError(f"{source}: unknown model {model_name!r} (known: {', '.join(MODELS)})")
    the_gpu, the_model = GPUS[gpu_name], MODELS[model_name]

    deployment = _section(data, "deployment", {"scaling", "spot", "gateway", "interruption", "model"}, source)
    scaling = dict(deployment.get("scaling") or {})
    if "calibration" not in scaling:
        # The simulated operator starts from the preset for this GPU and model,
        # or from the engine's own numbers (a user who measured it).
        preset = OPERATOR_PRESETS.get((gpu_name, model_name))
        if preset is not None:
            scaling["calibration"] = {"preset": preset}
        elif gpu_name in GPUS and model_name in MODELS:
            try:
                scaling["calibration"] = operator_rates(engine_spec_for(GPUS[gpu_name], MODELS[model_name]))
            except ProfileError:
                pass  # reported below, with the others
    profile_slo = data.get("slo") or {}
    if "slo" not in scaling and isinstance(profile_slo, dict):
        # One SLO: the profile's is the deployment's unless the deployment sets its own.
        scaling["slo"] = {
            k: v
            for k, v in (("ttftSeconds", profile_slo.get("ttftSeconds")), ("percentile", profile_slo.get("percentile")))
            if v is not None
        }
    body = {
        "spec": {
            **deployment,
            "model": {"name": the_model.hf_id, **(deployment.get("model") or {})},
            "scaling": scaling,
        }
    }
    spec = defaulted_spec(body)
    problems = []
    try:
        ScalingPolicy.from_spec(spec)
        SpotSettings.from_spec(spec)
    except (InvalidScalingPolicy, ValueError) as error:
        problems.append(str(error))
    except (KeyError, TypeError) as error:
        problems.append(f"deployment: bad scaling or spot settings ({error})")

    engine = engine_spec_for(the_gpu, the_model, max_model_len=spec["model"]["maxModelLen"])
    overrides = _section(
        data,
        "engine",
        {"prefillTokensPerSecond", "decodeTokensPerSecond", "kvCacheTokens", "maxNumSeqs", "maxNumBatchedTokens"},
        source,
    )
    engine = _override_engine(engine, overrides, problems)
    problems += engine.problems()

    pricing = _section(data, "pricing", {"onDemandPerGpuHour", "spotPerGpuHour"}, source)
    on_demand = _number(pricing, "onDemandPerGpuHour", the_gpu.on_demand_per_hour, problems, "pricing")
    spot_price = _number(pricing, "spotPerGpuHour", on_demand * SPOT_PRICE_FRACTION, problems, "pricing")
    for name, value in (("pricing.onDemandPerGpuHour", on_demand), ("pricing.spotPerGpuHour", spot_price)):
        if value < 0:
            problems.append(f"{name} must not be negative (got {value:g})")

    spot = _section(
        data, "spot", {"interruptionsPerHour", "noticeSeconds", "outages", "outagesPerDay", "outageMinutes"}, source
    )
    interruptions = _number(spot, "interruptionsPerHour", 0.05, problems, "spot")
    notice = _number(spot, "noticeSeconds", 120.0, problems, "spot")
    outages_per_day = _number(spot, "outagesPerDay", 0.0, problems, "spot")
    outage_minutes = _number(spot, "outageMinutes", 45.0, problems, "spot")
    outages = _outages(spot.get("outages") or [], problems)
    nodes = _section(data, "nodes", {"startSeconds", "modelLoadSeconds"}, source)
    node_start = _number(nodes, "startSeconds", 120.0, problems, "nodes")
    measured = MEASURED.get((gpu_name, model_name))
    model_load = _number(
        nodes, "modelLoadSeconds", measured.model_load_seconds if measured else 90.0, problems, "nodes"
    )
    slo = _section(data, "slo", {"ttftSeconds", "percentile"}, source)
    slo_ttft = _number(slo, "ttftSeconds", 2.0, problems, "slo")
    slo_percentile = _number(slo, "percentile", 95.0, problems, "slo")
    deployment_slo = spec["scaling"].get("slo") or {}
    if not problems and isinstance(deployment_slo, dict):  # the deployment's own SLO wins
        slo_ttft = float(deployment_slo.get("ttftSeconds", slo_ttft))
        slo_percentile = float(deployment_slo.get("percentile", slo_percentile))
    interval = _number(data, "controlIntervalSeconds", 10.0, problems, "")
    grace = _number(data, "terminationGracePeriodSeconds", 30.0, problems, "")
    not_negative = {
        "spot.interruptionsPerHour": interruptions,
        "spot.outagesPerDay": outages_per_day,
        "nodes.startSeconds": node_start,
        "nodes.modelLoadSeconds": model_load,
        "terminationGracePeriodSeconds": grace,
    }
    for name, value in not_negative.items():
        if value < 0:
            problems.append(f"{name} must not be negative (got {value:g})")
    for name, value in (
        ("spot.noticeSeconds", notice),
        ("spot.outageMinutes", outage_minutes),
        ("slo.ttftSeconds", slo_ttft),
        ("controlIntervalSeconds", interval),
    ):
        if not value > 0:
            problems.append(f"{name} must be positive (got {value:g})")
    if not 0 < slo_percentile <= 100:
        problems.append(f"slo.percentile must be in (0, 100] (got {slo_percentile:g})")

    baselines = _section(data, "baselines", {"kubeai", "keda"}, source)
    kubeai_keys = {"targetRequests", "intervalSeconds", "timeWindowSeconds", "scaleDownDelaySeconds"}
    keda_keys = {"waitingThreshold", "pollingIntervalSeconds", "scaleDownStabilizationSeconds"}
    kubeai = _settings(
        KubeAISettings, _section(baselines, "kubeai", kubeai_keys, f"{source}: baselines"), problems, "baselines.kubeai"
    )
    keda = _settings(
        KedaSettings, _section(baselines, "keda", keda_keys, f"{source}: baselines"), problems, "baselines.keda"
    )
    if problems:
        raise ProfileError(f"{source}: " + "; ".join(problems))
    return Profile(
        gpu=gpu_name,
        model=model_name,
        engine=engine,
        on_demand_price=on_demand,
        spot_price=spot_price,
        interruptions_per_hour=interruptions,
        notice_seconds=notice,
        spot_outages=outages,
        outages_per_day=outages_per_day,
        outage_minutes=outage_minutes,
        node_start_seconds=node_start,
        model_load_seconds=model_load,
        slo_ttft_seconds=slo_ttft,
        slo_percentile=slo_percentile,
        control_interval_seconds=interval,
        termination_grace_seconds=grace,
        spec=spec,
        max_replicas_set="maxReplicas" in scaling,
        target_set="targetQueuedTokensPerReplica" in scaling,
        utilization_set="targetUtilization" in (scaling.get("slo") or {}),
        kubeai=kubeai,
        keda=keda,
    )


def load_profile(path: str | pathlib.Path, *, gpu: str | None = None, model: str | None = None) -> Profile:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ProfileError(f"{path}: not valid YAML ({error})") from None
    if data is not None and not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a mapping, got {type(data).__name__}")
    return build_profile(data, gpu=gpu, model=model, source=str(path))


def _check_keys(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _section(data: dict, name: str, known: set[str], source: str) -> dict:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ProfileError(f"{source}: {name} must be a mapping, got {type(value).__name__}")
    _check_keys(value, known, f"{source}: {name}")
    return value


def _number(section: dict, key: str, default: float, problems: list[str], where: str) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where + '.' if where else ''}{key} must be a number, got {value!r}")
        return float(default)
    return float(value)


def _override_engine(engine: EngineSpec, overrides: dict, problems: list[str]) -> EngineSpec:
    changes: dict[str, Any] = {}
    if "prefillTokensPerSecond" in overrides:
        rate = _number(overrides, "prefillTokensPerSecond", 1.0, problems, "engine")
        if rate <= 0:
            problems.append(f"engine.prefillTokensPerSecond must be positive (got {rate:g})")
        else:
            changes["seconds_per_token"] = 1.0 / rate
    if "decodeTokensPerSecond" in overrides:
        rate = _number(overrides, "decodeTokensPerSecond", 1.0, problems, "engine")
        per_token = changes.get("seconds_per_token", engine.seconds_per_token)
        if rate <= 0:
            problems.append(f"engine.decodeTokensPerSecond must be positive (got {rate:g})")
        elif 1.0 / rate <= per_token:
            problems.append(f"engine.decodeTokensPerSecond ({rate:g}, one stream) must be below the prefill speed")
        else:
            changes["decode_step_seconds"] = 1.0 / rate - per_token
    for key, attribute in (
        ("kvCacheTokens", "kv_cache_tokens"),
        ("maxNumSeqs", "max_num_seqs"),
        ("maxNumBatchedTokens", "max_num_batched_tokens"),
    ):
        if key in overrides:
            value = overrides[key]
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"engine.{key} must be a whole number, got {value!r}")
            else:
                changes[attribute] = value
    return dataclasses.replace(engine, **changes)


def _outages(raw: Any, problems: list[str]) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list):
        problems.append(f"spot.outages must be a list of {{startHour, hours}}, got {raw!r}")
        return ()
    windows = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"startHour", "hours"}:
            problems.append(f"spot.outages[{index}] must be {{startHour: H, hours: N}}, got {item!r}")
            continue
        start, hours = item["startHour"], item["hours"]
        if (
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, hours))
            or start < 0
            or hours <= 0
        ):
            problems.append(f"spot.outages[{index}]: startHour must be >= 0 and hours > 0, got {item!r}")
            continue
        windows.append((start * 3600.0, (start + hours) * 3600.0))
    return tuple(sorted(windows))


def _settings(cls: type, section: dict, problems: list[str], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in section.items():
        attribute = "".join("_" + c.lower() if c.isupper() else c for c in key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append(f"{where}.{key} must be a positive number, got {value!r}")
            continue
        values[attribute] = float(value)
    return cls(**{k: v for k, v in values.items() if k in names})
