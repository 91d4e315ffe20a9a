"""How many engine emulators the box runs before the machine's cores are used up.

    python bench/box_capacity_bench.py --engines 2,4,8,16 --seconds 10

For each count: a Deployment of that many `vllm serve` pods in the box (each
an engine emulator process on a GPU node of its own), then, per engine, the
CPU its process uses (from /proc) idle and under load (`--streams`
concurrent streamed completions per engine from one client process), the
tokens per second the engines deliver, and the memory they hold. Prints one
row per count; the CPU column is in cores. The client's own CPU is reported
apart: on a shared machine it competes for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_box.cluster.node_pools import ClusterProfile, NodePool, Timing
from spotrag_box.cluster.simulated import SimulatedCluster
from spotrag_box.testing import eventually

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def deployment(replicas: int) -> dict:
    labels = {"app": "capacity"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "capacity", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai",
                            "command": ["vllm", "serve"],
                            "args": ["model", "--port", "8000", "--served-model-name", "m", "--max-model-len", "4096"],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                        }
                    ],
                },
            },
        },
    }


async def load(urls: list[str], streams: int, seconds: float) -> int:
    """Completion tokens the engines delivered in `seconds` of steady streams."""
    tokens = 0
    deadline = time.monotonic() + seconds

    async def stream(client: httpx.AsyncClient, url: str) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            body = {
                "model": "m",
                "prompt": "Tell me about ferries.",
                "max_tokens": 64,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(urls) * streams)) as client:
        await asyncio.gather(*(stream(client, url) for url in urls for _ in range(streams)))
    return tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/box_capacity_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="2,4,8,16", help="engine counts to try, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per step")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams per engine under load")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.engines.split(",")]
    profile = ClusterProfile(
        pools=(
            NodePool(
                name="gpu", instance_type="g6.2xlarge", zone="us-east-1a", capacity_type="on-demand", size=max(counts)
            ),
        )
    )
    with tempfile.TemporaryDirectory() as tmp, KubeAPIServer() as api:
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        with SimulatedCluster(
            kubeconfig, profile=profile, workdir=Path(tmp) / "box", timing=Timing(image_pull=0, model_load=0)
        ) as cluster:
            print(f"{os.cpu_count()} CPUs; {args.streams} streams per engine under load; {args.seconds:.0f}s windows")
            print(
                f"{'engines':>7} {'idle cores':>10} {'load cores':>10} {'tokens/s':>9} {'client cores':>12} {'MiB/engine':>10}"
            )
            for count in counts:
                api.apply(deployment(count))

                def all_ready() -> list[str] | None:
                    pods = _ready_pods(kubeconfig)
                    return pods if len(pods) >= count else None

                ready = eventually(all_ready, what=f"{count} engines to be ready", timeout=300, interval=0.5)
                pids = [p.pid for p in cluster.processes()]
                urls = [f"http://{ip}:8000" for ip in ready]
                idle = _cpu_window(pids, args.seconds)
                before = sum(cpu_seconds(pid) for pid in pids)
                client_before = time.process_time()
                started = time.monotonic()
                tokens = asyncio.run(load(urls, args.streams, args.seconds))
                elapsed = time.monotonic() - started
                busy = (sum(cpu_seconds(pid) for pid in pids) - before) / elapsed
                client = (time.process_time() - client_before) / elapsed
                memory = sum(rss_mib(pid) for pid in pids) / len(pids)
                print(
                    f"{count:>7} {idle:>10.2f} {busy:>10.2f} {tokens / elapsed:>9.0f} {client:>12.2f} {memory:>10.0f}",
                    flush=True,
                )
    return 0


def _ready_pods(kubeconfig: Path) -> list[str]:
    import kubernetes

    with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as client:
        pods = kubernetes.client.CoreV1Api(client).list_namespaced_pod("default", label_selector="app=capacity").items
    return [
        p.status.pod_ip
        for p in pods
        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


def _cpu_window(pids: list[int], seconds: float) -> float:
    before = sum(cpu_seconds(pid) for pid in pids)
    time.sleep(seconds)
    return (sum(cpu_seconds(pid) for pid in pids) - before) / seconds


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
