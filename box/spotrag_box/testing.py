"""Support for tests, benchmarks and the demo: waiting, processes, metrics, and the Kubernetes API stand-in.

- ``eventually`` / ``eventually_async``: wait for observable state instead of sleeping
- ``Program``: one of our commands in its own process group, with its log
- ``scrape`` / ``scrape_async``: a Prometheus page parsed by ``prometheus_client``
- ``running_kube_api``, ``kubectl``, ``helm``: the stand-in and the real CLIs against it::

    with running_kube_api(crds=[CRD_FILE]) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / 'kubeconfig')
        kubectl(kubeconfig, 'get', 'ragd', '-A')
        eventually(lambda: api.requests(since=mark), what='a request to the API')
"""

import asyncio
import contextlib
import dataclasses
import inspect
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar, cast

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from spotrag_box.apiserver.server import KubeAPIServer

__all__ = [
    "eventually",
    "eventually_async",
    "TimedOut",
    "Program",
    "ProgramExited",
    "spotrag_command",
    "start_api_server",
    "start_operator",
    "Metrics",
    "scrape",
    "scrape_async",
    "running_kube_api",
    "kubectl",
    "helm",
    "KubectlError",
    "kubectl_binary",
    "helm_binary",
]

_T = TypeVar("_T")

DEFAULT_WAIT = 15.0  # seconds; generous, since CI machines are slower than ours
DEFAULT_INTERVAL = 0.02


# --- waiting ------------------------------------------------------------------------------------


class TimedOut(AssertionError):
    """What ``eventually`` raises: an AssertionError, so a test reports it as a failure."""


class _Deadline:
    """The one timing rule of both waits: fail naming what never happened, the last result and a diagnosis."""

    def __init__(self, what: str, timeout: float, diagnose: Callable[[], str] | None) -> None:
        self.what, self.timeout, self.diagnose = what, timeout, diagnose
        self.end = time.monotonic() + timeout

    def check(self, last: object) -> None:
        if time.monotonic() > self.end:
            detail = f"\n{self.diagnose()}" if self.diagnose else ""
            raise TimedOut(f"timed out after {self.timeout:g}s waiting for {self.what}; last result: {last!r}{detail}")


def eventually(
    check: Callable[[], _T],
    *,
    what: str,
    timeout: float = DEFAULT_WAIT,
    interval: float = DEFAULT_INTERVAL,
    diagnose: Callable[[], str] | None = None,
) -> _T:
    """Call ``check`` until it returns something truthy and return that; TimedOut after ``timeout``."""
    deadline = _Deadline(what, timeout, diagnose)
    while not (result := check()):
        deadline.check(result)
        time.sleep(interval)
    return result


async def eventually_async(
    check: Callable[[], _T | Awaitable[_T]],
    *,
    what: str,
    timeout: float = DEFAULT_WAIT,
    interval: float = DEFAULT_INTERVAL,
    diagnose: Callable[[], str] | None = None,
) -> _T:
    """``eventually`` for the event loop: ``check`` may be sync or async, and waiting never blocks the loop."""
    deadline = _Deadline(what, timeout, diagnose)
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return cast(_T, result)
        deadline.check(result)
        await asyncio.sleep(interval)


# --- processes ----------------------------------------------------------------------------------


class ProgramExited(RuntimeError):
    """A Program that should still run has exited; the message carries its log's tail."""


def spotrag_command(*args: str) -> list[str]:
    """The ``spotrag`` command line of this interpreter (no install needed)."""
    return [sys.executable, "-m", "spotrag_runtime.cli", *args]


class Program:
    """A command of ours in its own process group, logging to a file, dying with this process
    (the box's launcher sets a parent-death signal)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: pathlib.Path,
        *,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "spotrag_box.cluster.launch", str(os.getpid()), "--", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=stdin,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise ProgramExited(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_api_server(
    kubeconfig: pathlib.Path,
    log_path: pathlib.Path,
    *,
    crds: Iterable[pathlib.Path] = (),
    port: int = 0,
    timeout: float = 60.0,
) -> Program:
    """``spotrag api-server`` in its own process, once it has written ``kubeconfig`` for itself."""
    argv = spotrag_command("api-server", "--port", str(port), "--kubeconfig-out", str(kubeconfig))
    for crd in crds:
        argv += ["--crd", str(crd)]
    api = Program("api-server", argv, log_path)

    def kubeconfig_written() -> bool:
        api.check_alive()
        return kubeconfig.exists()

    try:
        eventually(kubeconfig_written, what="the API stand-in to write its kubeconfig", timeout=timeout, interval=0.1)
    except TimedOut:
        api.stop()
        raise
    return api


def start_operator(kubeconfig: pathlib.Path, log_path: pathlib.Path, *, reconcile_interval: float = 1.0) -> Program:
    """``spotrag operator`` in its own process; no liveness or metrics port, so nothing fixed another run may hold."""
    return Program(
        "operator",
        spotrag_command(
            "operator",
            "--kubeconfig",
            str(kubeconfig),
            "--standalone",
            "--liveness",
            "",
            "--metrics-port",
            "0",
            "--reconcile-interval",
            f"{reconcile_interval:g}",
        ),
        log_path,
    )


# --- metrics ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metrics:
    """One scrape of a Prometheus page."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        return cls(tuple(sample for family in text_string_to_metric_families(text) for sample in family.samples))

    def find(self, name: str, **labels: str) -> list[Sample]:
        """The samples of ``name`` whose labels include ``labels``."""
        return [
            sample
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over ``find(name, **labels)``: 0 when absent, as a counter not yet incremented."""
        return sum(sample.value for sample in self.find(name, **labels))

    @property
    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


def scrape(url: str, *, timeout: float = 5.0, client: httpx.Client | None = None) -> Metrics:
    """GET a Prometheus page (through ``client`` when given: kept-alive connections for tight loops)."""
    response = (client or httpx).get(url, timeout=timeout)
    response.raise_for_status()
    return Metrics.parse(response.text)


async def scrape_async(url: str, *, timeout: float = 5.0) -> Metrics:
    async with httpx.AsyncClient(timeout=timeout) as http:
        response = await http.get(url)
    response.raise_for_status()
    return Metrics.parse(response.text)


# --- the Kubernetes API stand-in and the CLIs -----------------------------------------------------

# kubectl subcommands that validate what they send.
_VALIDATING_SUBCOMMANDS = frozenset({"apply", "create", "replace"})


@contextlib.contextmanager
def running_kube_api(
    *, crds: Iterable[str | pathlib.Path] = (), version: str = "v1.36.0", graceful_pod_deletion: bool = True
) -> Iterator["KubeAPIServer"]:
    """A started KubeAPIServer on a free port with the given CRD files applied; stopped on exit."""
    # Imported here: the rest of this module needs only the base install, the stand-in the box extra.
    from spotrag_box.apiserver.server import KubeAPIServer

    with KubeAPIServer(version=version, graceful_pod_deletion=graceful_pod_deletion) as api:
        for crd in crds:
            api.apply_crd_file(crd)
        yield api


def _binary(name: str) -> str:
    # The venv's own bin first (the project installs kubectl and helm there), then PATH.
    beside_python = pathlib.Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither beside {sys.executable} nor on PATH")
    return found


def kubectl_binary() -> str:
    return _binary("kubectl")


def helm_binary() -> str:
    return _binary("helm")


def kubectl(
    kubeconfig: str | pathlib.Path,
    *args: str,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    validate: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the real kubectl against the kubeconfig's server and capture its output.

    Each kubeconfig gets its own discovery cache (KUBECACHEDIR beside it), so a new
    server on a reused port is never answered from another server's cache.

    With ``validate`` (the default), kubectl validates as against a real cluster: the
    stand-in's OpenAPI documents declare no schemas, so kubectl asks the server for
    strict field validation and an unknown field of a custom resource is an error.
    ``validate=False`` adds ``--validate=false`` to apply/create/replace (unknown fields
    are then dropped silently, as ``--validate=false`` does on a real cluster).
    """
    kubeconfig = pathlib.Path(kubeconfig)
    arguments = list(args)
    if not validate and arguments and arguments[0] in _VALIDATING_SUBCOMMANDS:
        arguments.insert(1, "--validate=false")
    environment = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBECACHEDIR": str(kubeconfig.with_name(kubeconfig.name + ".kubecache")),
        "HOME": str(kubeconfig.parent),  # kubectl must not read or write the user's ~/.kube
    }
    return _run([kubectl_binary(), *arguments], environment, input=input, timeout=timeout, check=check)


def helm(
    kubeconfig: str | pathlib.Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real helm against the kubeconfig's server, with its cache, config and data beside it."""
    kubeconfig = pathlib.Path(kubeconfig)
    state = kubeconfig.with_name(kubeconfig.name + ".helm")
    environment = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBECACHEDIR": str(kubeconfig.with_name(kubeconfig.name + ".kubecache")),
        "HELM_CACHE_HOME": str(state / "cache"),
        "HELM_CONFIG_HOME": str(state / "config"),
        "HELM_DATA_HOME": str(state / "data"),
        "HOME": str(kubeconfig.parent),
    }
    return _run([helm_binary(), *args], environment, input=None, timeout=timeout, check=check)


def _run(
    command: list[str], environment: dict[str, str], *, input: str | None, timeout: float, check: bool
) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        command, env=environment, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and completed.returncode != 0:
        raise KubectlError(completed.returncode, completed.args, completed.stdout, completed.stderr)
    return completed


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl or helm, with what it said (CalledProcessError alone hides stderr)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"
