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
import pathlib
import statistics
import sys
import tempfile
import time

import yaml

from spotrag_box.testing import eventually, start_api_server, start_operator
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
    api = start_api_server(
        kubeconfig, workdir / "api-server.log", crds=[ROOT / "crds" / "spotrag.io_ragdeployments.yaml"], timeout=30
    )
    operator = None
    try:
        kube = Kube(api_client(str(kubeconfig)))
        operator = start_operator(kubeconfig, workdir / "operator.log", reconcile_interval=args.reconcile_interval)
        # Warm up: the operator's first reconcile includes its start.
        kube.create(ragd("warmup"))
        eventually(lambda: all_children(kube, "warmup", 2), what="the warm-up's children", timeout=60, interval=0.05)
        rss_idle = rss_mib(operator.process.pid)

        latencies = []
        for i in range(args.creates):
            name = f"lat{i}"
            start = time.perf_counter()
            kube.create(ragd(name))
            eventually(lambda: all_children(kube, name, 2), what=f"{name}'s children", interval=0.01)
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
            eventually(lambda: all_children(kube, f"fleet{i}", 2), what=f"fleet{i}'s children", interval=0.05)
        print(
            f"fleet of {args.fleet} RAGDeployments reconciled ({time.perf_counter() - start:.1f}s after the last create)"
        )
        time.sleep(3 * args.reconcile_interval)  # a few timer rounds over the whole fleet
        print(
            f"operator RSS: {rss_idle:.0f} MiB with 1 RAGDeployment, {rss_mib(operator.process.pid):.0f} MiB with {args.fleet} after {3 * args.reconcile_interval:.0f}s of timers"
        )
    finally:
        if operator is not None:
            operator.stop()
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
