"""Operator benchmark on the Kubernetes API stand-in.

1. CR create → all children present (Services, ConfigMap, ServiceAccount,
   Role, RoleBinding, Deployment, PDB, PVC and the engine pods): median and
   p95 over N creates, one at a time.
2. Operator RSS with M RAGDeployments reconciled.

The API stand-in (`spotrag api-server`) and the operator (`spotrag operator`)
run as separate processes, as in a cluster; RSS is the operator process's.

    .venv/bin/python bench/operator_bench.py --creates 50 --fleet 200
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from spotrag_runtime.kube import Kube, api_client

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILDREN = [
    ("v1", "Service", "{name}-engines"),
    ("v1", "Service", "{name}"),
    ("v1", "ConfigMap", "{name}-gateway"),
    ("v1", "ServiceAccount", "{name}-gateway"),
    ("v1", "PersistentVolumeClaim", "{name}-index"),
    ("apps/v1", "Deployment", "{name}-gateway"),
    ("policy/v1", "PodDisruptionBudget", "{name}-gateway"),
    ("rbac.authorization.k8s.io/v1", "Role", "{name}-gateway"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "{name}-gateway"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ragd(name: str) -> dict:
    body = yaml.safe_load((ROOT / "examples" / "basic.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": "default"}
    body["spec"]["retrieval"].pop("corpus")
    body["spec"]["scaling"] = {"minReplicas": 2, "maxReplicas": 4, "onDemandBaseline": 1}
    return body


def all_children(kube: Kube, name: str, engines: int) -> bool:
    for api_version, kind, pattern in CHILDREN:
        if kube.get(api_version, kind, pattern.format(name=name), "default") is None:
            return False
    pods = kube.list("v1", "Pod", "default", label_selector=f"spotrag.io/deployment={name},spotrag.io/component=engine")
    return len(pods) >= engines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--fleet", type=int, default=200)
    parser.add_argument("--reconcile-interval", type=float, default=10.0)
    args = parser.parse_args()

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="spotrag-bench-"))
    kubeconfig = workdir / "kubeconfig"
    port = free_port()
    spotrag = [sys.executable, "-m", "spotrag_runtime.cli"]
    api = subprocess.Popen(
        [
            *spotrag,
            "api-server",
            "--port",
            str(port),
            "--kubeconfig-out",
            str(kubeconfig),
            "--crd",
            str(ROOT / "crds" / "spotrag.io_ragdeployments.yaml"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    operator = None
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists():
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit("the API stand-in did not start")
            time.sleep(0.1)
        time.sleep(0.5)
        kube = Kube(api_client(str(kubeconfig)))
        env = os.environ | {"KUBECONFIG": str(kubeconfig)}
        operator = subprocess.Popen(
            [
                *spotrag,
                "operator",
                "--standalone",
                "--liveness",
                "",
                "--metrics-port",
                "0",
                "--reconcile-interval",
                str(args.reconcile_interval),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Warm up: the operator's first reconcile includes its start.
        kube.create(ragd("warmup"))
        while not all_children(kube, "warmup", 2):
            time.sleep(0.05)
        rss_idle = rss_mib(operator.pid)

        latencies = []
        for i in range(args.creates):
            name = f"lat{i}"
            start = time.perf_counter()
            kube.create(ragd(name))
            while not all_children(kube, name, 2):
                time.sleep(0.01)
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        p95 = latencies[max(0, int(round(0.95 * len(latencies))) - 1)]
        print(
            f"create → all children ({args.creates} creates, 2 engines each): median {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )

        existing = args.creates + 1
        for i in range(existing, args.fleet):
            kube.create(ragd(f"fleet{i}"))
        start = time.perf_counter()
        for i in range(existing, args.fleet):
            while not all_children(kube, f"fleet{i}", 2):
                time.sleep(0.05)
        print(
            f"fleet of {args.fleet} RAGDeployments reconciled ({time.perf_counter() - start:.1f}s after the last create)"
        )
        time.sleep(3 * args.reconcile_interval)  # a few timer rounds over the whole fleet
        print(
            f"operator RSS: {rss_idle:.0f} MiB with 1 RAGDeployment, {rss_mib(operator.pid):.0f} MiB with {args.fleet} after {3 * args.reconcile_interval:.0f}s of timers"
        )
    finally:
        for process in (operator, api):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
