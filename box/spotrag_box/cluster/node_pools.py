"""What the simulated cluster is made of: node pools and timing.

A pool is a group of identical nodes the way clouds sell them (an EKS
managed node group, a Karpenter NodePool's instances, a GKE node pool): one
instance type, one zone, one capacity type, a size. Each pool labels its
nodes the way its cloud's tooling does, so the operator's ORed node-affinity
terms meet the conventions it will meet in production, not one made up for
the box.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SPOT = "spot"
ON_DEMAND = "on-demand"

# Label conventions a pool can use for its capacity type.
KARPENTER = "karpenter"  # karpenter.sh/capacity-type=spot|on-demand
EKS_MANAGED = "eks"  # eks.amazonaws.com/capacityType=SPOT|ON_DEMAND
SPOTRAG = "spotrag"  # spotrag.io/capacity=spot|on-demand (labelled by hand)
LABEL_STYLES = (KARPENTER, EKS_MANAGED, SPOTRAG)

GPU_RESOURCE = "nvidia.com/gpu"
# AWS Inferentia/Trainium: the Neuron device plugin's resource, and the taint
# Neuron NodePools carry (docs/install-eks.md).
NEURON_RESOURCE = "aws.amazon.com/neuroncore"
NEURON_TAINT = "aws.amazon.com/neuron"
SIMULATED_LABEL = "box.spotrag.io/simulated"
POOL_LABEL = "box.spotrag.io/pool"


@dataclass(frozen=True, kw_only=True)
class InstanceType:
    name: str
    cpu: str  # allocatable, as the kubelet reports it after system reserves
    memory: str
    gpus: int = 0
    gpu_product: str | None = None
    max_pods: int = 58
    accelerator: str = GPU_RESOURCE  # the extended resource `gpus` counts (NeuronCores for inf2/trn1)


# Allocatable figures are what EKS reports for these types (capacity minus
# kube-reserved and the eviction threshold), rounded.
INSTANCE_TYPES = {
    t.name: t
    for t in (
        InstanceType(name="m6i.xlarge", cpu="3920m", memory="14480Mi"),
        InstanceType(name="g6.xlarge", cpu="3920m", memory="14480Mi", gpus=1, gpu_product="NVIDIA-L4"),
        InstanceType(name="g6.2xlarge", cpu="7910m", memory="29440Mi", gpus=1, gpu_product="NVIDIA-L4"),
        InstanceType(name="g6.12xlarge", cpu="47810m", memory="182400Mi", gpus=4, gpu_product="NVIDIA-L4"),
        InstanceType(name="g5.2xlarge", cpu="7910m", memory="29440Mi", gpus=1, gpu_product="NVIDIA-A10G"),
        InstanceType(name="inf2.xlarge", cpu="3920m", memory="14480Mi", gpus=2, accelerator=NEURON_RESOURCE),
        InstanceType(
            name="inf2.48xlarge", cpu="191450m", memory="737280Mi", gpus=24, max_pods=737, accelerator=NEURON_RESOURCE
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class NodePool:
    name: str
    instance_type: str
    zone: str
    capacity_type: str  # SPOT or ON_DEMAND
    size: int = 1
    label_style: str = SPOTRAG
    # GPU nodes carry the taint the NVIDIA GPU operator docs and most GPU
    # NodePools set, so only pods that ask for GPUs (and tolerate it) land there.
    gpu_taint: bool = True
    extra_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity_type not in (SPOT, ON_DEMAND):
            raise ValueError(
                f"pool {self.name}: capacity_type must be {SPOT!r} or {ON_DEMAND!r}, not {self.capacity_type!r}"
            )
        if self.label_style not in LABEL_STYLES:
            raise ValueError(f"pool {self.name}: label_style must be one of {LABEL_STYLES}, not {self.label_style!r}")
        if self.instance_type not in INSTANCE_TYPES:
            raise ValueError(
                f"pool {self.name}: unknown instance type {self.instance_type!r} (known: {', '.join(sorted(INSTANCE_TYPES))})"
            )
        if self.size < 0:
            raise ValueError(f"pool {self.name}: size must not be negative")

    @property
    def instance(self) -> InstanceType:
        return INSTANCE_TYPES[self.instance_type]

    def node_labels(self, node_name: str) -> dict[str, str]:
        instance = self.instance
        labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": instance.name,
            "topology.kubernetes.io/zone": self.zone,
            "topology.kubernetes.io/region": self.zone.rstrip("abcdef"),
            SIMULATED_LABEL: "true",
            POOL_LABEL: self.name,
        }
        if self.label_style == KARPENTER:
            labels["karpenter.sh/capacity-type"] = self.capacity_type
            labels["karpenter.sh/nodepool"] = self.name
        elif self.label_style == EKS_MANAGED:
            labels["eks.amazonaws.com/capacityType"] = "SPOT" if self.capacity_type == SPOT else "ON_DEMAND"
            labels["eks.amazonaws.com/nodegroup"] = self.name
        else:
            labels["spotrag.io/capacity"] = self.capacity_type
        if instance.gpus and instance.accelerator == NEURON_RESOURCE:
            labels["karpenter.k8s.aws/instance-accelerator-manufacturer"] = "aws"
            labels["karpenter.k8s.aws/instance-accelerator-count"] = str(instance.gpus // 2)
        elif instance.gpus:
            labels["nvidia.com/gpu.present"] = "true"
            labels["nvidia.com/gpu.count"] = str(instance.gpus)
            if instance.gpu_product:
                labels["nvidia.com/gpu.product"] = instance.gpu_product
        return labels | self.extra_labels

    def node_taints(self) -> list[dict]:
        if self.instance.gpus and self.gpu_taint:
            key = NEURON_TAINT if self.instance.accelerator == NEURON_RESOURCE else GPU_RESOURCE
            return [{"key": key, "value": "true", "effect": "NoSchedule"}]
        return []


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Seconds the simulated parts take. Real ones are minutes; the box
    shortens them so a scenario runs in seconds, keeping their order."""

    image_pull: float = 0.5
    model_load: float = 1.5  # the engine emulator's --startup-delay
    node_provision: float = 8.0  # a replacement node joins after this
    probe_period: float = 0.5  # readiness probes (a pod's own period if shorter)
    restart_backoff: float = 1.0  # first CrashLoopBackOff wait; doubles, capped at 10 s
    resync: float = 2.0  # controllers re-check everything at least this often
    # Speed of the emulated engines (see `spotrag engine-emulator --help`).
    engine_ttft_ms: float = 40.0
    engine_itl_ms: float = 8.0
    engine_answer_words: str = "24:48"


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    pools: tuple[NodePool, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")

    @property
    def zones(self) -> list[str]:
        return sorted({p.zone for p in self.pools})

    def with_pool_size(self, name: str, size: int) -> ClusterProfile:
        if name not in {p.name for p in self.pools}:
            raise KeyError(f"no pool {name!r}")
        return ClusterProfile(
            pools=tuple(dataclasses.replace(p, size=size) if p.name == name else p for p in self.pools)
        )

    @classmethod
    def default(cls) -> ClusterProfile:
        """Two zones; CPU nodes for gateways; one on-demand GPU node and two
        spot GPU nodes per zone. Zone a is labelled as Karpenter does, zone b
        as an EKS managed node group (on-demand) and by hand (spot)."""
        return cls(
            pools=(
                NodePool(
                    name="system-a",
                    instance_type="m6i.xlarge",
                    zone="us-east-1a",
                    capacity_type=ON_DEMAND,
                    label_style=KARPENTER,
                ),
                NodePool(
                    name="system-b",
                    instance_type="m6i.xlarge",
                    zone="us-east-1b",
                    capacity_type=ON_DEMAND,
                    label_style=EKS_MANAGED,
                ),
                NodePool(
                    name="gpu-od-a",
                    instance_type="g6.2xlarge",
                    zone="us-east-1a",
                    capacity_type=ON_DEMAND,
                    label_style=KARPENTER,
                ),
                NodePool(
                    name="gpu-od-b",
                    instance_type="g6.2xlarge",
                    zone="us-east-1b",
                    capacity_type=ON_DEMAND,
                    label_style=EKS_MANAGED,
                ),
                NodePool(
                    name="gpu-spot-a",
                    instance_type="g6.2xlarge",
                    zone="us-east-1a",
                    capacity_type=SPOT,
                    size=2,
                    label_style=KARPENTER,
                ),
                NodePool(
                    name="gpu-spot-b",
                    instance_type="g5.2xlarge",
                    zone="us-east-1b",
                    capacity_type=SPOT,
                    size=2,
                    label_style=SPOTRAG,
                ),
            )
        )
