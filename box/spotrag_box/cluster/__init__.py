"""A simulated GPU cluster behind a Kubernetes API: nodes with GPUs in two
zones, a scheduler, kubelets that run engine emulators and gateways as local
processes, EndpointSlice and Deployment controllers, a volume provisioner,
and a cloud that runs out of spot capacity and interrupts spot nodes.

Test and demo infrastructure, not a Kubernetes replacement: every part
talks to the API over HTTP like a controller does, so the operator and the
gateway cannot tell they are not on EKS or GKE (docs/cluster-in-a-box.md
lists what is simulated and how).
"""

from .cloud import INTERRUPTION_STYLES, Interruption
from .node_pools import (
    EKS_MANAGED,
    INSTANCE_TYPES,
    KARPENTER,
    ON_DEMAND,
    SPOT,
    SPOTRAG,
    ClusterProfile,
    InstanceType,
    NodePool,
    Timing,
)
from .simulated import ClusterError, ProcessInfo, SimulatedCluster

__all__ = [
    "EKS_MANAGED",
    "INSTANCE_TYPES",
    "INTERRUPTION_STYLES",
    "KARPENTER",
    "ON_DEMAND",
    "SPOT",
    "SPOTRAG",
    "ClusterError",
    "ClusterProfile",
    "InstanceType",
    "Interruption",
    "NodePool",
    "ProcessInfo",
    "SimulatedCluster",
    "Timing",
]
