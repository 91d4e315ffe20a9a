"""AWS Inferentia/Trainium across the project: the simulator's instance
presets, and the NeuronCore table the CRD's CEL rule and the operator's
checks share."""

from __future__ import annotations

import re

import pytest
import yaml

from spotrag_operator.checks import NEURON_CORES, gpu_fit_problem
from spotrag_operator.crd import defaulted_spec
from spotrag_simulator.presets import GPUS, MODELS, build_profile, engine_spec_for

from .operator_fixtures import ROOT


def test_the_crds_neuroncore_table_is_the_operators():
    text = (ROOT / "crds" / "spotrag.io_ragdeployments.yaml").read_text()
    rule = next(line for line in text.splitlines() if "instanceTypes.all(" in line)
    table = dict(re.findall(r"'([a-z0-9.]+)': (\d+)", rule.split("&&")[0]))
    assert {name: int(cores) for name, cores in table.items()} == NEURON_CORES


@pytest.mark.parametrize("instance", ["inf2.48xlarge", "trn1.32xlarge"])
def test_a_70b_model_fits_one_neuron_instance_and_is_priced_per_instance(instance):
    profile = build_profile({"gpu": instance, "model": "70b"})
    assert profile.on_demand_price == GPUS[instance].on_demand_per_hour
    assert profile.spot_price < profile.on_demand_price
    engine = engine_spec_for(GPUS[instance], MODELS["70b"])
    assert engine.problems() == []
    assert engine.kv_cache_tokens > 8192


def test_the_inf2_example_fits_its_instances():
    ragd = next(
        d for d in yaml.safe_load_all((ROOT / "examples" / "eks-inf2.yaml").read_text()) if d["kind"] == "RAGDeployment"
    )
    spec = defaulted_spec(ragd)
    assert gpu_fit_problem(spec) is None
    too_big = defaulted_spec({"spec": {**ragd["spec"], "model": {**ragd["spec"]["model"], "tensorParallelSize": 32}}})
    assert "inf2.48xlarge has 24" in gpu_fit_problem(too_big)


@pytest.mark.parametrize(
    "instance, capacity, fits",
    [
        ("inf2.48xlarge", "on-demand", True),
        ("inf2.48xlarge", "spot", True),
        ("inf2.xlarge", "spot", False),  # 2 NeuronCores: 24 do not fit
        ("g6.12xlarge", "spot", False),  # a GPU node: not the instance type asked for, no NeuronCores
    ],
)
def test_the_box_schedules_a_neuron_engine_only_where_its_neuroncores_and_taint_fit(instance, capacity, fits):
    """The rendered Neuron engine against the box's Neuron node pools, through
    the box scheduler's filters (taints, affinity, extended resources)."""
    from spotrag_box.cluster.cloud import node_manifest
    from spotrag_box.cluster.node_pools import NodePool
    from spotrag_box.cluster.scheduler_plugins import schedule
    from spotrag_operator import render

    body = next(
        d for d in yaml.safe_load_all((ROOT / "examples" / "eks-inf2.yaml").read_text()) if d["kind"] == "RAGDeployment"
    )
    body["metadata"]["uid"] = "u"
    spec = defaulted_spec(body)
    if instance != "inf2.48xlarge":
        spec["gpu"]["instanceTypes"] = [instance]
    spec["model"]["resources"] = {"requests": {"cpu": "2", "memory": "8Gi"}}
    pod = render.engine_pod(body, spec, capacity)
    pool = NodePool(
        name="pool", instance_type=instance, zone="us-east-1a", capacity_type=capacity, label_style="karpenter"
    )
    node = node_manifest(pool, "node-1")
    decision = schedule(pod, [node], {})
    assert (decision.node == "node-1") is fits, decision.message
    if instance == "inf2.xlarge":
        assert "Insufficient aws.amazon.com/neuroncore" in decision.message
