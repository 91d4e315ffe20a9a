"""Gateway benchmark: the spotrag gateway against other OpenAI-compatible
routers in front of the same two engine emulators, and retrieval on its own.

Proxies (one run, side by side, the same engines and load):

- ``direct``: straight to one engine (no proxy; the baseline)
- ``spotrag``: the gateway with RAG off (``spotrag gateway`` as a process) in
  its default configuration (``tokenCounting: auto``: no /tokenize before the
  first token), one worker process, queuing by tokens; ``spotrag-w<N>``: the
  same with N worker processes; ``spotrag-engine``: counting every prompt
  with the engines' /tokenize first; ``spotrag-estimate``: ``tokenCounting:
  estimate``
- ``vllm-router-rr`` / ``vllm-router-cache``: PyPI ``vllm-router`` (Rust) with
  ``--policy round_robin`` / ``cache_aware``
- ``litellm``: the litellm proxy, when it is installed
- ``python-floor``: bench/python_floor_relay.py, uvicorn and aiohttp relaying
  bytes and doing nothing else: what the gateway's Python stack costs before
  any of the gateway's own work

Each cell is a closed loop of C clients streaming chat completions of 64
tokens (engines: TTFT 20 ms, ITL 5 ms, 256 batch slots each); the requests
that end within ``--duration`` seconds after ``--warmup`` are counted. Reported: requests/s, time to first token p50/p99, the
proxy's CPU time per request (its process tree, from /proc), errors.

Discovery: how fast an engine whose EndpointSlice turns not-ready leaves the
gateway's serving set (the gateway process watching the Kubernetes API
stand-in).

Retrieval: the gateway's RetrievalService (real MiniLM embedding of each
question, micro-batching, faiss) over synthetic indexes of 10k and 100k
passages (random unit vectors; the index type the index builder picks for
that size, tuned to its recall target), 1/8/32 concurrent questions.

Cores: ``--proxy-cpus``, ``--engine-cpus`` and ``--load-cpus`` pin the
proxy under test (whichever it is, with all its threads and worker
processes), the engines (one core each, in turn) and the load generator to
their own cores, so proxies are compared on the same cores and nothing else
takes CPU from them; ``--load-processes N`` spreads the clients over N
processes (one Python event loop cannot read 400 answers/s of 64 chunks).

vllm-router and litellm are not project dependencies: install them in
throwaway venvs and pass their commands (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from spotrag_box.testing import eventually, scrape
from spotrag_runtime.engine_emulator import EmulatorProcess, start_engine_emulator

MODEL = "bench"
ANSWER_TOKENS = 64
SYSTEM_PROMPT = (
    "You are the assistant of a ferry line. Answer briefly and politely, cite the handbook where you can, "
    "and say plainly when you do not know. Prices are in pounds; times are local."
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- measuring ----------------------------------------------------------------


def process_tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1] is the parent pid
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])  # utime, stime
        stack.extend(children.get(pid, ()))
    return total / CLOCK_TICKS


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Cell:
    target: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list, repr=False)
    error_kinds: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float | None = None

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "requests_per_second": round(self.requests_per_second, 1),
            "ttft_p50_ms": round(percentile(self.ttft, 0.5) * 1000, 1),
            "ttft_p99_ms": round(percentile(self.ttft, 0.99) * 1000, 1),
            "proxy_cpu_ms_per_request": (
                round(self.cpu_seconds * 1000 / self.requests, 2)
                if self.cpu_seconds is not None and self.requests
                else None
            ),
        }


async def one_request(session: aiohttp.ClientSession, url: str, number: int, headers: dict) -> tuple[float, str | None]:
    """Stream one answer; (time to first token, what went wrong or None).

    Complete means [DONE] arrived after a usage chunk counting 64 tokens (an
    engine that falls behind sends several tokens in one chunk, as vLLM does,
    so chunks are not counted)."""
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Question {number}: when does the ferry to Skarholm leave?"},
        ],
        "max_tokens": ANSWER_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first_token = None
    completion_tokens = None
    done = False
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return float("nan"), f"HTTP {response.status}"
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if first_token is None:
                # Parse only until the first token, and the usage chunk at the end.
                delta = (json.loads(line[5:]).get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content"):
                    first_token = time.perf_counter() - started
            elif b'"completion_tokens"' in line:
                completion_tokens = (json.loads(line[5:]).get("usage") or {}).get("completion_tokens")
    if not done or completion_tokens != ANSWER_TOKENS:
        return float("nan"), f"incomplete ({completion_tokens} tokens, [DONE] {'seen' if done else 'missing'})"
    return first_token or float("nan"), None


async def run_clients(
    target: str, url: str, concurrency: int, *, window_start: float, window_end: float, headers: dict
) -> Cell:
    """``concurrency`` clients in closed loops until ``window_end`` (time.monotonic(),
    the same clock in every process); what ends inside the window counts."""
    cell = Cell(target, concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while time.monotonic() < window_end:
                try:
                    ttft, problem = await one_request(session, url, next(counter), headers)
                except (TimeoutError, aiohttp.ClientError) as error:
                    ttft, problem = float("nan"), type(error).__name__
                ended = time.monotonic()
                # Steady state: what finished inside the window, whenever it started.
                if window_start <= ended <= window_end:
                    if problem is None:
                        cell.requests += 1
                        cell.ttft.append(ttft)
                    else:
                        cell.errors += 1
                        cell.error_kinds[problem] = cell.error_kinds.get(problem, 0) + 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return cell


def _load_process(
    target: str, url: str, concurrency: int, window: tuple[float, float], headers: dict, cpus: set[int] | None, results
) -> None:
    """One load-generator process (multiprocessing's target): its share of the clients."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    cell = asyncio.run(
        run_clients(target, url, concurrency, window_start=window[0], window_end=window[1], headers=headers)
    )
    results.put((cell.requests, cell.errors, cell.ttft, cell.error_kinds))


def run_cell(
    target: str,
    url: str,
    concurrency: int,
    *,
    warmup: float,
    duration: float,
    proxy_pid: int | None,
    headers: dict,
    load_processes: int = 1,
    load_cpus: set[int] | None = None,
) -> Cell:
    """One cell: the clients (in ``load_processes`` processes), and the proxy's
    CPU over the window."""
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    shares = [concurrency // load_processes + (i < concurrency % load_processes) for i in range(load_processes)]
    processes = [
        context.Process(target=_load_process, args=(target, url, share, window, headers, load_cpus, results))
        for share in shares
        if share
    ]
    for process in processes:
        process.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))  # a benchmark's clock, not synchronisation
    cpu_at_start = process_tree_cpu_seconds(proxy_pid) if proxy_pid else None
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu_at_end = process_tree_cpu_seconds(proxy_pid) if proxy_pid else None
    cell = Cell(target, concurrency, seconds=duration)
    for _ in processes:
        requests, errors, ttft, error_kinds = results.get()
        cell.requests += requests
        cell.errors += errors
        cell.ttft += ttft
        for kind, count in error_kinds.items():
            cell.error_kinds[kind] = cell.error_kinds.get(kind, 0) + count
    for process in processes:
        process.join()
    if cpu_at_start is not None and cpu_at_end is not None:
        cell.cpu_seconds = cpu_at_end - cpu_at_start
    return cell


# --- what runs ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen | None, timeout: float, headers: dict | None = None) -> None:
    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, headers=headers, timeout=2).status_code == 200
        return False

    eventually(ready, what=f"{url} to answer 200", timeout=timeout, interval=0.2)


@contextlib.contextmanager
def proxy_process(
    argv: list[str],
    ready_url: str,
    *,
    log: Path,
    env: dict | None = None,
    timeout: float = 180,
    headers: dict | None = None,
    cpus: set[int] | None = None,
) -> Iterator[subprocess.Popen]:
    """``argv`` running until the block ends; on ``cpus`` only (it, its threads
    and every process it starts) when given."""
    with log.open("w") as output:
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    try:
        wait_http(ready_url, process, timeout, headers)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def start_target(
    name: str, engines: list[EmulatorProcess], work: Path, args: argparse.Namespace
) -> Iterator[tuple[str, int | None, dict]]:
    """(base URL, proxy pid or None, request headers) for a target."""
    urls = [engine.url for engine in engines]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if name == "direct":
        yield urls[0], None, {}
    elif name == "spotrag" or name.startswith("spotrag-"):
        config = work / f"{name}.json"
        variant, _, workers = name.partition("-w")
        counting = {"spotrag": "auto", "spotrag-engine": "engine", "spotrag-estimate": "estimate"}[variant]
        config.write_text(
            json.dumps(
                {
                    "servedModelName": MODEL,
                    "retrieval": {"enabled": False},
                    "engines": {"discovery": "static", "urls": urls},
                    "admission": {"maxQueuedRequests": 4096, "tokenCounting": counting},
                }
            )
        )
        argv = [
            sys.executable,
            "-m",
            "spotrag_runtime.gateway.cli",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *(["--workers", workers] if workers else []),
        ]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.gateway_pythonpath, os.environ.get("PYTHONPATH")]))}
        with proxy_process(argv, f"{base}/readyz", log=work / f"{name}.log", env=env, cpus=args.proxy_cpus) as process:
            yield base, process.pid, {}
    elif name == "python-floor":
        argv = [sys.executable, str(Path(__file__).with_name("python_floor_relay.py")), str(port), ",".join(urls)]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.gateway_pythonpath, os.environ.get("PYTHONPATH")]))}
        with proxy_process(argv, f"{base}/readyz", log=work / f"{name}.log", env=env, cpus=args.proxy_cpus) as process:
            yield base, process.pid, {}
    elif name.startswith("vllm-router"):
        policy = {"vllm-router-rr": "round_robin", "vllm-router-cache": "cache_aware"}[name]
        argv = [
            args.vllm_router,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *urls,
            "--policy",
            policy,
            "--log-level",
            "warning",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
        ]
        with proxy_process(argv, f"{base}/v1/models", log=work / f"{name}.log", cpus=args.proxy_cpus) as process:
            yield base, process.pid, {}
    elif name == "litellm":
        config = work / "litellm.yaml"
        deployments = "".join(
            f'  - model_name: {MODEL}\n    litellm_params: {{model: hosted_vllm/{MODEL}, api_base: "{url}/v1", '
            f"api_key: none}}\n"
            for url in urls
        )
        config.write_text(f"model_list:\n{deployments}litellm_settings: {{telemetry: false}}\n")
        headers = {"Authorization": "Bearer sk-bench"}
        env = {"LITELLM_MASTER_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
        argv = [args.litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        with proxy_process(
            argv, f"{base}/health/liveliness", log=work / "litellm.log", env=env, timeout=300, cpus=args.proxy_cpus
        ) as process:
            yield base, process.pid, headers
    else:
        raise ValueError(f"unknown target {name!r}")


@contextlib.contextmanager
def running_engines(count: int, cpus: set[int] | None = None) -> Iterator[list[EmulatorProcess]]:
    """The neutral backends every proxy is measured in front of (TTFT 20 ms,
    5 ms per token, 64 tokens, 256 batch slots), ready; one core each in turn of ``cpus``."""
    engines = [
        start_engine_emulator(
            served_model_name=MODEL,
            ttft_ms=20,
            itl_ms=5,
            max_num_seqs=256,
            answer_words_min=4 * ANSWER_TOKENS,
            answer_words_max=4 * ANSWER_TOKENS,
        )
        for _ in range(count)
    ]
    try:
        cores = sorted(cpus or ())
        for number, engine in enumerate(engines):
            if cores:
                os.sched_setaffinity(engine.pid, {cores[number % len(cores)]})
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def proxy_benchmark(args: argparse.Namespace, work: Path) -> list[dict]:
    targets = [t for t in args.targets.split(",") if t]
    missing = {"vllm-router-rr": args.vllm_router, "vllm-router-cache": args.vllm_router, "litellm": args.litellm}
    results = []
    with running_engines(args.engines, args.engine_cpus) as engines:
        for target in targets:
            if target in missing and not missing[target]:
                print(f"skipping {target}: not installed (see --help)", file=sys.stderr)
                continue
            with start_target(target, engines, work, args) as (url, pid, headers):
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    cell = run_cell(
                        target,
                        url,
                        concurrency,
                        warmup=args.warmup,
                        duration=args.duration,
                        proxy_pid=pid,
                        headers=headers,
                        load_processes=args.load_processes,
                        load_cpus=args.load_cpus,
                    )
                    results.append(cell.summary())
                    print(json.dumps(results[-1]), flush=True)
    return results


# --- retrieval alone ---------------------------------------------------------------


def synthetic_index(root: Path, count: int, dimension: int, model: str) -> str:
    """A published index version of ``count`` random unit vectors, built the way
    the index builder builds one that size; returns its index type."""
    import faiss
    import numpy as np

    from spotrag_runtime.index.vector_index import build_vector_index, choose_index_type
    from spotrag_runtime.retrieval.store import (
        CURRENT_FILE,
        INDEX_FILE,
        MANIFEST_FILE,
        PASSAGES_FILE,
        VERSIONS_DIR,
        Manifest,
        Passage,
        file_checksum,
    )

    vectors = np.random.default_rng(7).standard_normal((count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = build_vector_index(vectors, choose_index_type(count), use_gpu=False)
    version = f"synthetic-{count}"
    folder = root / VERSIONS_DIR / version
    folder.mkdir(parents=True)
    faiss.write_index(built.index, str(folder / INDEX_FILE))
    with (folder / PASSAGES_FILE).open("w") as stream:
        for number in range(count):
            stream.write(
                Passage(number, f"Synthetic passage {number} about ferries.", "synthetic", number).to_json() + "\n"
            )
    manifest = Manifest(
        model=model,
        dimension=dimension,
        query_prefix="",
        passage_prefix="",
        count=count,
        index_type=built.index_type,
        metric="inner_product",
        normalized=True,
        checksum=file_checksum([folder / INDEX_FILE, folder / PASSAGES_FILE]),
        version=version,
        created_at="2026-01-01T00:00:00+00:00",
        recall_at_10=built.recall_at_10,
        chunking={},
        search_params=built.search_params,
    )
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    (root / CURRENT_FILE).write_text(version)
    return f"{built.index_type} {built.search_params or ''}".strip()


async def retrieval_cells(
    root: Path, embedder, questions: list[str], duration: float, concurrencies: list[int]
) -> list[dict]:
    from spotrag_runtime.gateway.config import RetrievalConfig
    from spotrag_runtime.gateway.metrics import GatewayMetrics
    from spotrag_runtime.gateway.retrieval_service import RetrievalService

    service = RetrievalService(RetrievalConfig(index_path=str(root)), metrics=GatewayMetrics(), embedder=embedder)
    await service.start()
    results = []
    try:
        for concurrency in concurrencies:
            latencies: list[float] = []
            deadline = time.perf_counter() + duration
            counter = iter(range(10**9))

            async def client() -> None:
                while time.perf_counter() < deadline:
                    question = questions[next(counter) % len(questions)]
                    began = time.perf_counter()
                    await service.search(question)
                    latencies.append(time.perf_counter() - began)

            await asyncio.gather(*(client() for _ in range(concurrency)))
            results.append(
                {
                    "concurrency": concurrency,
                    "queries_per_second": round(len(latencies) / duration, 1),
                    "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
                    "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
                }
            )
    finally:
        await service.close()
    return results


def retrieval_benchmark(args: argparse.Namespace, work: Path) -> list[dict]:
    from spotrag_runtime.index import load_sample_questions
    from spotrag_runtime.retrieval import DEFAULT_MODEL, Embedder, set_torch_threads

    set_torch_threads(1)
    embedder = Embedder(DEFAULT_MODEL, device="cpu")
    questions = [sample.question for sample in load_sample_questions()]
    results = []
    for size in (int(s) for s in args.retrieval_sizes.split(",")):
        root = work / f"index-{size}"
        started = time.perf_counter()
        index_type = synthetic_index(root, size, embedder.dimension, embedder.model_name)
        print(f"built {size} passages ({index_type}) in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        concurrencies = [int(c) for c in args.retrieval_concurrency.split(",")]
        for row in asyncio.run(retrieval_cells(root, embedder, questions, args.duration, concurrencies)):
            results.append({"passages": size, "index": index_type, **row})
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(root)
    return results


# --- discovery ------------------------------------------------------------------------


def discovery_benchmark(args: argparse.Namespace, work: Path) -> dict:
    """How long after an EndpointSlice says an engine is no longer ready the
    gateway stops routing to it: the gateway process watches the Kubernetes
    API stand-in; the time is from the PATCH's answer to the gateway's
    serving-engine gauge showing one engine fewer (polled every 5 ms)."""
    import kubernetes

    from spotrag_box.apiserver.server import KubeAPIServer

    def slice_body(name: str, port: int, ready: bool) -> dict:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "engines"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
        }

    def wait_for(metrics_url: str, count: int) -> float:
        def seen() -> bool:
            return scrape(metrics_url, client=http).value("spotrag_engines", state="serving") == count

        started = time.perf_counter()
        eventually(seen, what=f"the gateway to see {count} engines", timeout=30, interval=0.005)
        return time.perf_counter() - started

    latencies = []
    with KubeAPIServer() as api, httpx.Client() as http:  # one kept-alive connection for the 5 ms polls
        kubeconfig = api.write_kubeconfig(work / "kubeconfig")
        with kubernetes.config.new_client_from_config(str(kubeconfig)) as client:
            discovery = kubernetes.client.DiscoveryV1Api(client)
            for name, port in (("engines-a", 18001), ("engines-b", 18002)):
                discovery.create_namespaced_endpoint_slice("default", slice_body(name, port, True))
            config = work / "discovery.json"
            config.write_text(
                json.dumps(
                    {
                        "servedModelName": MODEL,
                        "retrieval": {"enabled": False},
                        "engines": {"discovery": "endpointslices", "service": "engines", "namespace": "default"},
                    }
                )
            )
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "spotrag_runtime.gateway.cli",
                "--config",
                str(config),
                "--port",
                str(port),
                "--kubeconfig",
                str(kubeconfig),
                "--log-level",
                "warning",
            ]
            metrics_url = f"http://127.0.0.1:{port}/metrics"
            with proxy_process(argv, f"http://127.0.0.1:{port}/readyz", log=work / "discovery.log"):
                for _ in range(args.discovery_flips):
                    discovery.replace_namespaced_endpoint_slice(
                        "engines-a", "default", slice_body("engines-a", 18001, False)
                    )
                    latencies.append(wait_for(metrics_url, 1))
                    discovery.replace_namespaced_endpoint_slice(
                        "engines-a", "default", slice_body("engines-a", 18001, True)
                    )
                    wait_for(metrics_url, 2)
    result = {
        "flips": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
    }
    print(json.dumps({"discovery": result}), flush=True)
    return result


# --- the command ------------------------------------------------------------------


def layout(args: argparse.Namespace) -> str:
    def cores(cpus: set[int] | None) -> str:
        return ",".join(map(str, sorted(cpus))) if cpus else "any"

    return (
        f"{args.engines} engines (cores {cores(args.engine_cpus)}), proxy on cores {cores(args.proxy_cpus)}, "
        f"load in {args.load_processes} process(es) on cores {cores(args.load_cpus)}, {os.cpu_count()} cores here"
    )


def cpu_list(text: str) -> set[int]:
    """``0-3,8`` as taskset writes it → {0, 1, 2, 3, 8}."""
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def markdown(proxy: list[dict], retrieval: list[dict], discovery: dict | None) -> str:
    lines = []
    if proxy:
        # Throughput relative to vllm-router round_robin at the same concurrency, where it ran.
        router = {row["concurrency"]: row["requests_per_second"] for row in proxy if row["target"] == "vllm-router-rr"}
        lines += [
            "| target | C | req/s | × router rr | TTFT p50 ms | TTFT p99 ms | proxy CPU ms/req | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in proxy:
            cpu = "–" if row["proxy_cpu_ms_per_request"] is None else row["proxy_cpu_ms_per_request"]
            base = router.get(row["concurrency"])
            ratio = f"{row['requests_per_second'] / base:.2f}" if base else "–"
            lines.append(
                f"| {row['target']} | {row['concurrency']} | {row['requests_per_second']} | {ratio} | "
                f"{row['ttft_p50_ms']} | {row['ttft_p99_ms']} | {cpu} | {row['errors']} |"
            )
    if retrieval:
        lines += [
            "",
            "| passages | index | concurrent | queries/s | p50 ms | p99 ms |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for row in retrieval:
            lines.append(
                f"| {row['passages']} | {row['index']} | {row['concurrency']} | {row['queries_per_second']} | "
                f"{row['p50_ms']} | {row['p99_ms']} |"
            )
    if discovery:
        lines += [
            "",
            f"EndpointSlice not ready -> out of the gateway's serving set, over {discovery['flips']} flips: "
            f"p50 {discovery['p50_ms']} ms, p99 {discovery['p99_ms']} ms, max {discovery['max_ms']} ms",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="direct,spotrag,vllm-router-rr,vllm-router-cache,litellm")
    parser.add_argument("--concurrency", default="1,32,128,512")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each cell's window")
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"), help="the vllm-router command")
    parser.add_argument("--litellm", default=shutil.which("litellm"), help="the litellm command")
    parser.add_argument(
        "--gateway-pythonpath",
        default="",
        help="prepended to the gateway's PYTHONPATH only (e.g. a folder with uvloop and httptools)",
    )
    parser.add_argument("--retrieval-sizes", default="10000,100000", help="'' to skip the retrieval part")
    parser.add_argument("--retrieval-concurrency", default="1,8,32")
    parser.add_argument(
        "--discovery-flips", type=int, default=50, help="EndpointSlice readiness flips to time (0 to skip)"
    )
    parser.add_argument("--engines", type=int, default=2, help="engine emulators behind every proxy")
    parser.add_argument("--proxy-cpus", type=cpu_list, help="cores for the proxy under test, e.g. 0 or 0-1")
    parser.add_argument("--engine-cpus", type=cpu_list, help="cores for the engines, one engine per core in turn")
    parser.add_argument("--load-cpus", type=cpu_list, help="cores for the load generator")
    parser.add_argument("--load-processes", type=int, default=1, help="load-generator processes sharing the clients")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    # 512 clients and their proxied connections need more than the usual 1024
    # descriptors, here and in every process started from here (peers included).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="spotrag-gateway-bench-"))
    try:
        proxy = proxy_benchmark(args, work) if args.targets else []
        retrieval = retrieval_benchmark(args, work) if args.retrieval_sizes else []
        discovery = discovery_benchmark(args, work) if args.discovery_flips else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(layout(args))
    print(markdown(proxy, retrieval, discovery))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"layout": layout(args), "proxy": proxy, "retrieval": retrieval, "discovery": discovery}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
