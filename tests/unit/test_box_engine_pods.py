"""What the box makes of the engine pods issue 18 renders: a standby's
--enable-sleep-mode reaches the engine emulator (waking in the measured
0.80 s), and a node model cache (hostPath) is one folder per simulated node,
shared by the engines there and kept for the next."""

from __future__ import annotations

import random
from pathlib import Path

from spotrag_box.cluster.containers import LocalRuntime
from spotrag_box.cluster.node_pools import Timing
from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec

from .operator_fixtures import ragdeployment

CACHE = {"hostPath": "/var/lib/spotrag/models"}


def scheduled(pod: dict, name: str, node: str) -> dict:
    pod["metadata"] |= {"name": name, "uid": f"{name}-uid-0000"}
    pod["spec"]["nodeName"] = node
    return pod


async def no_objects(kind: str, namespace: str, name: str) -> None:
    return None


async def prepare(runtime: LocalRuntime, pod: dict):
    ip = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    prepared = await runtime.prepare(pod, pod["spec"]["containers"][0], no_objects, ip)
    prepared.close_sockets()
    return prepared


async def test_a_standby_runs_the_emulator_in_sleep_mode_and_the_cache_is_the_nodes(tmp_path: Path) -> None:
    body = ragdeployment({"model": {"standby": {"replicas": 1}, "cache": CACHE}})
    spec = defaulted_spec(body)
    runtime = LocalRuntime(workdir=tmp_path, kubeconfig="unused", claim_paths={}, timing=Timing(model_load=1.0))
    standby = await prepare(runtime, scheduled(render.standby_pod(body, spec, render.SPOT), "s1", "gpu-1"))
    argv = standby.argv
    assert "--enable-sleep-mode" in argv and argv[argv.index("--wake-seconds") + 1] == "0.8"
    # HF_HOME goes through the link the init container sets (the box runs no init containers).
    assert standby.env["HF_HOME"].endswith("/current/huggingface")

    mounts = await runtime._mounts(
        scheduled(render.engine_pod(body, spec, render.SPOT), "e1", "gpu-1"),
        render.engine_pod(body, spec, render.SPOT)["spec"]["containers"][0],
        no_objects,
    )
    other = await runtime._mounts(
        scheduled(render.engine_pod(body, spec, render.SPOT), "e2", "gpu-2"),
        render.engine_pod(body, spec, render.SPOT)["spec"]["containers"][0],
        no_objects,
    )
    on_gpu_1 = Path(mounts.translate(render.NODE_CACHE_MOUNT))
    (on_gpu_1 / "weights").write_text("w")
    again = await runtime._mounts(
        scheduled(render.engine_pod(body, spec, render.SPOT), "e3", "gpu-1"),
        render.engine_pod(body, spec, render.SPOT)["spec"]["containers"][0],
        no_objects,
    )
    assert (Path(again.translate(render.NODE_CACHE_MOUNT)) / "weights").read_text() == "w"  # the next engine there
    assert not (Path(other.translate(render.NODE_CACHE_MOUNT)) / "weights").exists()  # not on another node
