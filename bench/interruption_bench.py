"""Spot-interruption benchmark: N notices injected into the cluster in a box
under steady streaming load, half as AWS Node Termination Handler relays
them (taint ``aws-node-termination-handler/spot-itn`` + cordon), half as GKE
does (taint ``cloud.google.com/impending-node-termination``).

Everything that reacts is the real program: the API stand-in (``spotrag
api-server``), the operator (``spotrag operator``), the gateway, the engine
emulators; the cluster (scheduler, kubelets, EndpointSlice controller, the
cloud) runs in this process, as in the e2e suite.

Measured per interruption, from the moment the notice is written on the Node:

- out of the serving set: the engine pod labelled ``spotrag.io/serving=false``
  (seen by a watch on pods); its endpoint gone from the engine Service's
  EndpointSlices (seen by a watch on slices); the gateway's serving set one
  engine smaller (its ``spotrag_engines`` gauge, polled every 10 ms);
- the replacement engine Ready (the first engine pod created after the notice,
  seen Ready by the pod watch).

And over the run: requests sent and failed (a failure is an error, an answer
cut short, or a text other than the deterministic one), streams the gateway
resumed on another engine, requests it retried before the first token.

What is shortened so that 100 interruptions fit in minutes on two cores:
notices (AWS 120 s → 12 s, GCP 30 s → 6 s; the operator still assumes the
real 120 s / 30 s, since neither taint carries a time), image pull 0.2 s,
model load 0.5 s, node provisioning 3 s, the engines' speed (TTFT 40 ms,
8 ms per token). Retrieval is off (it is not on the interruption path and
costs CPU the box needs). There are spare spot nodes (3 per zone for 4 spot
engines), so "replacement Ready" is engine start, not node start.

    python bench/interruption_bench.py                     # 100 interruptions
    python bench/interruption_bench.py -n 10 --out /tmp/interruptions.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import yaml

from spotrag_box.testing import Program, eventually, scrape, start_api_server, start_operator

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "spotrag.io_ragdeployments.yaml"
EXAMPLE = REPO / "examples" / "basic.yaml"
NAMESPACE = "bench"
NAME = "spotty"
SERVED_MODEL = "qwen2.5-7b"
SPOT_ENGINES = 4
ON_DEMAND_ENGINES = 1
SHORT_QUESTIONS = [
    "What keeps an answer alive when a spot node is taken back?",
    "How are queued tokens counted?",
    "Which engine gets the next request?",
    "Why does retrieval run on CPU?",
]


# The load: a separate process, so it never competes with the cluster for this one's GIL -----


def expected_answer(question: str, *, max_tokens: int, ignore_eos: bool, answer_words: tuple[int, int]) -> str:
    """What the engine emulator answers (seed 0, no retrieval): the reference text."""
    from spotrag_runtime.engine_emulator import text

    continuation = text.chat_answer(
        [text.Message("user", question)], seed=0, answer_words=answer_words, continue_final_message=False
    )
    count = max_tokens if ignore_eos else min(continuation.natural_remaining, max_tokens)
    return "".join(itertools.islice(continuation.deltas, count))


async def run_load(
    url: str, *, short_clients: int, long_clients: int, long_tokens: int, answer_words: tuple[int, int], out: Path
) -> None:
    """Closed-loop streaming clients (official openai client) until stdin closes."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    kinds = [("short", 64, False)] * short_clients + [("long", long_tokens, True)] * long_clients
    expected = {
        (kind, q): expected_answer(q, max_tokens=tokens, ignore_eos=eos, answer_words=answer_words)
        for kind, tokens, eos in set(kinds)
        for q in SHORT_QUESTIONS
    }
    stats: dict[str, Any] = {"requests": 0, "ok": 0, "by_kind": {}, "failures": []}

    async def worker(index: int, kind: str, tokens: int, ignore_eos: bool) -> None:
        for number in itertools.count():
            if stop.is_set():
                return
            question = SHORT_QUESTIONS[(index + number) % len(SHORT_QUESTIONS)]
            stats["requests"] += 1
            try:
                stream = await client.chat.completions.create(
                    model=SERVED_MODEL,
                    stream=True,
                    max_tokens=tokens,
                    messages=[{"role": "user", "content": question}],
                    extra_body={"rag": False, **({"ignore_eos": True} if ignore_eos else {})},
                )
                parts, finish = [], None
                async for chunk in stream:
                    for choice in chunk.choices:
                        parts.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
                text = "".join(parts)
                if finish is None:
                    raise RuntimeError(f"cut short after {len(text.split())} words")
                if text != expected[(kind, question)]:
                    raise RuntimeError(f"text differs from the uninterrupted answer ({len(text.split())} words)")
                stats["ok"] += 1
                stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
            except Exception as error:
                stats["failures"].append(f"{time.time():.3f} {kind}: {type(error).__name__}: {error}")

    await asyncio.gather(*(worker(i, *kind) for i, kind in enumerate(kinds)))
    out.write_text(json.dumps(stats))


# The box -------------------------------------------------------------------------------


def wait(check, what: str, timeout: float, programs: list[Program], interval: float = 0.1) -> Any:
    """``eventually``, failing early when one of ``programs`` has exited."""

    def checked() -> Any:
        for program in programs:
            program.check_alive()
        return check()

    return eventually(checked, what=what, timeout=timeout, interval=interval)


@contextlib.contextmanager
def box(work: Path, args: argparse.Namespace) -> Iterator[tuple[Path, Any, list[Program]]]:
    from spotrag_box.cluster import ClusterProfile, SimulatedCluster, Timing

    kubeconfig = work / "kubeconfig"
    programs: list[Program] = []
    cluster = None
    try:
        programs.append(start_api_server(kubeconfig, work / "api-server.log", crds=[CRD_FILE]))
        timing = Timing(
            image_pull=args.image_pull,
            model_load=args.model_load,
            node_provision=args.node_provision,
            probe_period=0.5,
            resync=2.0,
        )
        profile = (
            ClusterProfile.default()
            .with_pool_size("gpu-spot-a", args.spot_nodes_per_zone)
            .with_pool_size("gpu-spot-b", args.spot_nodes_per_zone)
        )
        cluster = SimulatedCluster(kubeconfig, workdir=work / "cluster", timing=timing, profile=profile).start()
        programs.append(start_operator(kubeconfig, work / "operator.log", reconcile_interval=1))
        yield kubeconfig, cluster, programs
    finally:
        for program in reversed(programs[1:]):
            program.stop()
        if cluster is not None:
            cluster.stop()
        if programs:
            programs[0].stop()


def manifest() -> list[dict]:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = body["spec"]
    spec["retrieval"] = {"enabled": False}
    spec["scaling"] = {
        "minReplicas": SPOT_ENGINES + ON_DEMAND_ENGINES,
        "maxReplicas": SPOT_ENGINES + ON_DEMAND_ENGINES,
        "onDemandBaseline": ON_DEMAND_ENGINES,
    }
    spec["spot"] = {"fallbackAfterSeconds": 10, "retryAfterSeconds": 30}
    spec["interruption"] = {"preStopSeconds": 2, "drainTimeoutSeconds": 30}
    spec["gateway"] = {"replicas": 1}
    spec["model"]["shutdownTimeoutSeconds"] = 10
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, body]


# Watching what happens -----------------------------------------------------------------


@dataclasses.dataclass
class PodSeen:
    name: str
    first_seen: float
    node: str | None = None
    capacity: str | None = None
    ready_at: float | None = None
    unserving_at: float | None = None
    deleted_at: float | None = None


class Watcher:
    """Pods and EndpointSlices as a watch sees them, with the time each change arrived."""

    def __init__(self, api_client: Any):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.discovery = kubernetes.client.DiscoveryV1Api(api_client)
        self.pods: dict[str, PodSeen] = {}
        self.endpoint_gone: dict[str, float] = {}  # pod → when its endpoint left the engine Service's slices
        self._in_slices: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(self._watch_pods,), daemon=True),
            threading.Thread(target=self._run, args=(self._watch_slices,), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, watch) -> None:
        while not self._stop.is_set():
            try:
                watch()
            except Exception:
                time.sleep(0.2)

    def _watch_pods(self) -> None:
        listed = self.core.list_namespaced_pod(
            NAMESPACE, label_selector=f"spotrag.io/deployment={NAME},spotrag.io/component=engine"
        )
        for pod in listed.items:
            self._pod(pod, "ADDED", time.time())
        stream = kubernetes.watch.Watch().stream(
            self.core.list_namespaced_pod,
            NAMESPACE,
            label_selector=f"spotrag.io/deployment={NAME},spotrag.io/component=engine",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=300,
        )
        for event in stream:
            self._pod(event["object"], event["type"], time.time())
            if self._stop.is_set():
                return

    def _pod(self, pod: Any, kind: str, now: float) -> None:
        name = pod.metadata.name
        with self._lock:
            seen = self.pods.setdefault(name, PodSeen(name, now))
            seen.node = pod.spec.node_name or seen.node
            seen.capacity = (pod.metadata.labels or {}).get("spotrag.io/capacity")
            serving = (pod.metadata.labels or {}).get("spotrag.io/serving") == "true"
            ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
            if ready and serving and seen.ready_at is None:
                seen.ready_at = now
            if not serving and seen.unserving_at is None:
                seen.unserving_at = now
            if kind == "DELETED" and seen.deleted_at is None:
                seen.deleted_at = now

    def _watch_slices(self) -> None:
        selector = f"kubernetes.io/service-name={NAME}-engines"
        listed = self.discovery.list_namespaced_endpoint_slice(NAMESPACE, label_selector=selector)
        slices = {s.metadata.name: s for s in listed.items}
        self._slices(slices, time.time())
        stream = kubernetes.watch.Watch().stream(
            self.discovery.list_namespaced_endpoint_slice,
            NAMESPACE,
            label_selector=selector,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=300,
        )
        for event in stream:
            item = event["object"]
            if event["type"] == "DELETED":
                slices.pop(item.metadata.name, None)
            else:
                slices[item.metadata.name] = item
            self._slices(slices, time.time())
            if self._stop.is_set():
                return

    def _slices(self, slices: dict[str, Any], now: float) -> None:
        ready = {
            e.target_ref.name
            for s in slices.values()
            for e in s.endpoints or []
            if e.target_ref and e.conditions and e.conditions.ready
        }
        with self._lock:
            for name in self._in_slices - ready:
                self.endpoint_gone.setdefault(name, now)
            self._in_slices = ready


def gateway_engines(url: str, http: httpx.Client) -> int | None:
    """Engines in the gateway's serving set (serving + cooling down), from its /metrics."""
    try:
        metrics = scrape(f"{url}/metrics", timeout=2, client=http)
    except httpx.HTTPError:
        return None
    return int(sum(metrics.value("spotrag_engines", state=state) for state in ("serving", "cooling_down")))


def gateway_counter(url: str, name: str, **labels: str) -> float:
    return scrape(f"{url}/metrics").value(name, **labels)


# The run -------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest rank: the smallest value at least `fraction` of the values do not exceed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(1000 * statistics.median(values)),
        "p90_ms": round(1000 * percentile(values, 0.9)),
        "p99_ms": round(1000 * percentile(values, 0.99)),
        "max_ms": round(1000 * max(values)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="spotrag-interruption-bench-"))
    with box(work, args) as (kubeconfig, cluster, programs):
        api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core = kubernetes.client.CoreV1Api(api_client)
        kubectl = [str(Path(sys.executable).parent / "kubectl"), "--kubeconfig", str(kubeconfig)]
        subprocess.run(
            [*kubectl, "apply", "--validate=false", "-f", "-"],
            input=yaml.safe_dump_all(manifest()),
            text=True,
            check=True,
            capture_output=True,
        )

        def engines() -> list[Any]:
            pods = core.list_namespaced_pod(
                NAMESPACE, label_selector=f"spotrag.io/deployment={NAME},spotrag.io/component=engine"
            ).items
            return [p for p in pods if not p.metadata.deletion_timestamp]

        def serving(capacity: str) -> list[Any]:
            return [
                p
                for p in engines()
                if p.metadata.labels.get("spotrag.io/capacity") == capacity
                and p.metadata.labels.get("spotrag.io/serving") == "true"
                and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            ]

        def gateway_url() -> str | None:
            pods = core.list_namespaced_pod(
                NAMESPACE, label_selector=f"spotrag.io/deployment={NAME},spotrag.io/component=gateway"
            ).items
            for pod in pods:
                if pod.status.pod_ip and any(
                    c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
                ):
                    return f"http://{pod.status.pod_ip}:8080"
            return None

        url = wait(gateway_url, "a Ready gateway", 180, programs, interval=0.5)
        http = httpx.Client()
        total = SPOT_ENGINES + ON_DEMAND_ENGINES
        wait(
            lambda: (
                len(serving("spot")) == SPOT_ENGINES
                and len(serving("on-demand")) == ON_DEMAND_ENGINES
                and gateway_engines(url, http) == total
            ),
            "every engine serving",
            120,
            programs,
            interval=0.5,
        )
        watcher = Watcher(api_client)
        words = tuple(int(w) for w in cluster.timing.engine_answer_words.split(":"))
        load_out = work / "load.json"
        load = Program(
            "load",
            [
                sys.executable,
                __file__,
                "--load-url",
                url,
                "--load-out",
                str(load_out),
                "--short-clients",
                str(args.short_clients),
                "--long-clients",
                str(args.long_clients),
                "--long-tokens",
                str(args.long_tokens),
                "--answer-words",
                f"{words[0]}:{words[1]}",
            ],
            work / "load.log",
            stdin=subprocess.PIPE,
        )
        programs.append(load)
        time.sleep(3)  # the load reaches its steady state
        resumed_before = gateway_counter(url, "spotrag_resumed_streams_total")
        retries_before = gateway_counter(url, "spotrag_retries_total")
        setup_s = time.monotonic() - started
        records = []
        for i in range(args.interruptions):
            style, notice = ("aws", args.aws_notice) if i % 2 == 0 else ("gke", args.gcp_notice)

            def victim() -> Any:
                pending = cluster.interruptions()
                if (
                    len(serving("spot")) != SPOT_ENGINES
                    or len(serving("on-demand")) != ON_DEMAND_ENGINES
                    or gateway_engines(url, http) != total
                ):
                    return None
                candidates = [p for p in serving("spot") if p.spec.node_name not in pending]
                return rng.choice(candidates) if candidates else None

            pod = wait(victim, f"every engine serving again before interruption {i + 1}", 120, programs, interval=0.1)
            time.sleep(rng.uniform(0, args.gap))
            name, node = pod.metadata.name, pod.spec.node_name
            before = gateway_engines(url, http)
            t0 = time.time()
            cluster.interrupt_node(node, style=style, notice_seconds=notice)
            gateway_at = None
            while time.time() - t0 < 10:
                count = gateway_engines(url, http)
                if count is not None and before is not None and count < before:
                    gateway_at = time.time()
                    break
                time.sleep(0.01)
            records.append(
                {
                    "i": i,
                    "style": style,
                    "notice_s": notice,
                    "node": node,
                    "pod": name,
                    "t0": t0,
                    "gateway_s": None if gateway_at is None else gateway_at - t0,
                }
            )
            print(
                f"[{time.monotonic() - started:6.1f}s] {i + 1}/{args.interruptions} {style} {node} {name}: gateway "
                f"{'-' if gateway_at is None else f'{1000 * (gateway_at - t0):.0f} ms'}",
                flush=True,
            )

        # The last replacements Ready, then stop the load and let the last answers end.
        wait(
            lambda: len(serving("spot")) == SPOT_ENGINES,
            "the last replacement to be serving",
            120,
            programs,
            interval=0.2,
        )
        time.sleep(1)
        resumed = gateway_counter(url, "spotrag_resumed_streams_total") - resumed_before
        retries = gateway_counter(url, "spotrag_retries_total") - retries_before
        assert load.process.stdin is not None
        load.process.stdin.close()
        load.process.wait(180)
        outcomes = {
            o: gateway_counter(url, "spotrag_requests_total", outcome=o)
            for o in ("success", "engine_failed", "unavailable", "queue_full", "error")
        }
        programs.remove(load)
        watcher.stop()
        load_stats = json.loads(load_out.read_text())

    # Attribute: each interruption's victim, and the first engine pod created after its notice.
    new_pods = sorted((p for p in watcher.pods.values() if p.first_seen > records[0]["t0"]), key=lambda p: p.first_seen)
    taken: set[str] = set()
    for record in records:
        seen = watcher.pods.get(record["pod"])
        record["label_s"] = seen.unserving_at - record["t0"] if seen and seen.unserving_at else None
        gone = watcher.endpoint_gone.get(record["pod"])
        record["slice_s"] = gone - record["t0"] if gone else None
        replacement = next((p for p in new_pods if p.name not in taken and p.first_seen >= record["t0"]), None)
        if replacement is not None:
            taken.add(replacement.name)
            record["replacement"] = replacement.name
            record["replacement_capacity"] = replacement.capacity
            record["replacement_ready_s"] = replacement.ready_at - record["t0"] if replacement.ready_at else None
        record["deleted_s"] = seen.deleted_at - record["t0"] if seen and seen.deleted_at else None

    def column(key: str, style: str | None = None) -> list[float]:
        return [r[key] for r in records if r.get(key) is not None and (style is None or r["style"] == style)]

    return {
        "command": " ".join(["python", "bench/interruption_bench.py", *sys.argv[1:]]),
        "interruptions": len(records),
        "by_style": {s: sum(1 for r in records if r["style"] == s) for s in ("aws", "gke")},
        "settings": {k: v for k, v in vars(args).items() if k not in ("load_url", "load_out", "out")},
        "setup_s": round(setup_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "out_of_serving": {
            "label": summary(column("label_s")),
            "endpointslice": summary(column("slice_s")),
            "gateway": summary(column("gateway_s")),
        },
        "replacement_ready": summary(column("replacement_ready_s")),
        "replacements_on": {
            c: sum(1 for r in records if r.get("replacement_capacity") == c) for c in ("spot", "on-demand")
        },
        "victim_deleted": {s: summary(column("deleted_s", s)) for s in ("aws", "gke")},
        "requests": load_stats["requests"],
        "requests_ok": load_stats["ok"],
        "requests_by_kind": load_stats["by_kind"],
        "requests_failed": len(load_stats["failures"]),
        "failures": load_stats["failures"][:20],
        "gateway_outcomes": outcomes,
        "streams_resumed": resumed,
        "retried_before_first_token": retries,
        "records": records,
    }


def markdown(result: dict[str, Any]) -> str:
    def cell(s: dict[str, Any]) -> str:
        return f"{s['p50_ms']} / {s['p90_ms']} / {s['p99_ms']} / {s['max_ms']} ms (n={s['n']})" if s.get("n") else "-"

    out = result["out_of_serving"]
    lines = [
        f"{result['interruptions']} interruptions ({result['by_style']['aws']} AWS NTH-style, {result['by_style']['gke']} GKE-style) in {result['wall_s']} s",
        "",
        "| from the notice to | p50 / p90 / p99 / max |",
        "|---|---|",
        f"| the engine labelled `spotrag.io/serving=false` | {cell(out['label'])} |",
        f"| its endpoint gone from the engine Service's EndpointSlices | {cell(out['endpointslice'])} |",
        f"| the gateway's serving set without it | {cell(out['gateway'])} |",
        f"| the replacement engine Ready | {cell(result['replacement_ready'])} |",
        f"| the interrupted engine's pod gone, AWS-style | {cell(result['victim_deleted']['aws'])} |",
        f"| the interrupted engine's pod gone, GKE-style | {cell(result['victim_deleted']['gke'])} |",
        "",
        (
            f"requests: {result['requests']} sent, {result['requests_ok']} complete and exact ({result['requests_by_kind']}), "
            f"**{result['requests_failed']} failed**; streams resumed on another engine: {result['streams_resumed']:.0f}; "
            f"retried before the first token: {result['retried_before_first_token']:.0f}; replacements on {result['replacements_on']}"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", "--interruptions", type=int, default=100)
    parser.add_argument("--aws-notice", type=float, default=12.0, help="seconds of an AWS-style notice (AWS: 120)")
    parser.add_argument("--gcp-notice", type=float, default=6.0, help="seconds of a GKE-style notice (GCE spot: 30)")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.5,
        help="at most this many seconds (uniform) between all engines serving again and the next notice",
    )
    parser.add_argument(
        "--short-clients", type=int, default=4, help="clients streaming short answers (natural length, <= 64 tokens)"
    )
    parser.add_argument("--long-clients", type=int, default=3, help="clients streaming long answers (ignore_eos)")
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=1500,
        help="tokens of a long answer (8 ms each or more: longer than a GKE-style notice)",
    )
    parser.add_argument("--image-pull", type=float, default=0.2)
    parser.add_argument("--model-load", type=float, default=0.5)
    parser.add_argument("--node-provision", type=float, default=3.0)
    parser.add_argument("--spot-nodes-per-zone", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the full result (every interruption) as JSON here")
    parser.add_argument("--load-url", help=argparse.SUPPRESS)
    parser.add_argument("--load-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--answer-words", default="24:48", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_url:
        low, _, high = args.answer_words.partition(":")
        asyncio.run(
            run_load(
                args.load_url,
                short_clients=args.short_clients,
                long_clients=args.long_clients,
                long_tokens=args.long_tokens,
                answer_words=(int(low), int(high)),
                out=args.load_out,
            )
        )
        return 0
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    print(markdown(result))
    return 0 if result["requests_failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
