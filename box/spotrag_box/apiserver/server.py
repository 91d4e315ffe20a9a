"""A Kubernetes API server stand-in on 127.0.0.1, for tests and the demo.

``KubeAPIServer`` serves the stand-in (``emulator.py`` wires its parts) over
real HTTP in its own thread and event loop, so synchronous code (the
``kubernetes`` client, kubectl in a subprocess) and asynchronous code (kopf in
another thread) all talk to it as to a cluster::

    with KubeAPIServer() as api:
        api.apply_crd_file('crds/spotrag.io_ragdeployments.yaml')
        kubeconfig = api.write_kubeconfig(tmp_path / 'kubeconfig')
        api.inject_faults(method='PATCH', path_regex=r'/ragdeployments/demo$', status=500, times=2)
        ...
        assert [r.status for r in api.requests() if r.method == 'PATCH'][:3] == [500, 500, 200]

``spotrag api-server`` runs the same server in the foreground.
"""

import argparse
import asyncio
import concurrent.futures
import pathlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.web
import yaml

from spotrag_box.apiserver.discovery import DEFAULT_SERVER_VERSION
from spotrag_box.apiserver.emulator import KubeEmulator
from spotrag_box.apiserver.errors import ApiError
from spotrag_box.apiserver.http import DEFAULT_REQUEST_LOG_SIZE, RecordedRequest

__all__ = ["KubeAPIServer", "RecordedRequest", "ApiError", "cli"]

_T = TypeVar("_T")
_SHUTDOWN_TIMEOUT = 2.0  # open watches are closed first, so handlers end almost at once


class KubeAPIServer:
    """The stand-in API server: start it, point a kubeconfig at ``url``, stop it."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = DEFAULT_SERVER_VERSION,
        graceful_pod_deletion: bool = True,
        request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self._version = version
        self.graceful_pod_deletion = graceful_pod_deletion
        self.request_log_size = request_log_size
        self.url = ""
        self._emulator: KubeEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def version(self) -> str:
        """The gitVersion that /version reports; settable while running (clients probe it)."""
        return self._version

    @version.setter
    def version(self, value: str) -> None:
        self._version = value
        if self._thread is not None:
            self.call(lambda emulator: setattr(emulator.discovery, "server_version", value))

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self._thread = threading.Thread(target=self._run, name=f"kube-api-server:{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start() when it happens before the server is up
            if not self._ready.is_set():
                self._startup_error = e
                self._ready.set()
            else:
                raise

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        listener = socket.create_server((self.host, self.port))
        bound_port = listener.getsockname()[1]
        emulator = KubeEmulator(
            server_version=self._version,
            graceful_pod_deletion=self.graceful_pod_deletion,
            request_log_size=self.request_log_size,
            server_address=f"{self.host}:{bound_port}",
        )
        runner = aiohttp.web.ServerRunner(
            aiohttp.web.Server(emulator.http, handler_cancellation=True),
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            site = aiohttp.web.SockSite(runner, listener)
            await site.start()
            self._emulator = emulator
            self.port = bound_port
            self.url = f"http://{self.host}:{bound_port}"
            self._ready.set()
            await self._stopping.wait()
            emulator.store.close_watches()
        finally:
            await runner.cleanup()

    # --- use ---------------------------------------------------------------------------------------

    @property
    def emulator(self) -> KubeEmulator:
        """The stand-in; touch it only through ``call()`` (it lives in the server's thread)."""
        if self._emulator is None:
            raise RuntimeError("the server is not started")
        return self._emulator

    def call(self, fn: Callable[[KubeEmulator], _T]) -> _T:
        """Run ``fn(emulator)`` in the server's event loop and return its result."""
        if self._loop is None or self._emulator is None or self._thread is None:
            raise RuntimeError("the server is not started")
        emulator = self._emulator

        async def in_loop() -> _T:
            return fn(emulator)

        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(in_loop(), self._loop)
        return future.result()

    def write_kubeconfig(self, path: str | pathlib.Path) -> pathlib.Path:
        """A kubeconfig for this server (any token works; namespace ``default``)."""
        if not self.url:
            raise RuntimeError("the server is not started")
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        name = "spotrag-box"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": name,
                    "preferences": {},
                    "clusters": [{"name": name, "cluster": {"server": self.url}}],
                    "users": [{"name": name, "user": {"token": "spotrag-box-token"}}],
                    "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
                },
                sort_keys=False,
            )
        )
        return path

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create the object, or replace the one of that name, as ``kubectl apply`` would end up."""
        return self.call(lambda emulator: emulator.writes.apply(obj))

    def apply_crd_file(self, path: str | pathlib.Path) -> None:
        """Apply every document of a YAML file (CRDs are then served), like ``kubectl apply -f``."""
        for document in _documents(pathlib.Path(path)):
            self.apply(document)

    def inject_faults(self, *, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``method`` ('*' for any) whose path matches with ``status``."""
        self.emulator.http.inject_faults(method=method, path_regex=path_regex, status=status, times=times)

    def requests(self, since: int = 0) -> list[RecordedRequest]:
        """The recorded requests with an ``id`` above ``since``, oldest first.

        The log is bounded (the oldest are dropped first): to see what a step caused,
        take ``mark = api.request_count`` before it and ``api.requests(since=mark)`` after.
        """
        return self.emulator.http.recorded_requests(since)

    @property
    def request_count(self) -> int:
        """How many requests the server has had: the ``id`` of the latest one."""
        return self.emulator.http.request_count


def _documents(path: pathlib.Path) -> list[dict[str, Any]]:
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    for document in documents:
        if not isinstance(document, dict) or "apiVersion" not in document or "kind" not in document:
            raise ValueError(f"{path}: every document needs apiVersion and kind")
    return documents


# --- spotrag api-server ------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spotrag api-server", description="Run the Kubernetes API stand-in in the foreground until interrupted."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument("--version", default=DEFAULT_SERVER_VERSION, help="the Kubernetes version /version reports")
    parser.add_argument("--kubeconfig-out", type=pathlib.Path, help="write a kubeconfig for the server here")
    parser.add_argument(
        "--crd",
        type=pathlib.Path,
        action="append",
        default=[],
        help="a YAML file of CRDs (or any objects) to apply at start; repeatable",
    )
    args = parser.parse_args(argv)
    server = KubeAPIServer(host=args.host, port=args.port, version=args.version)
    try:
        server.start()
    except OSError as e:
        print(f"spotrag api-server: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    try:
        for path in args.crd:
            try:
                server.apply_crd_file(path)
            except (OSError, ValueError, ApiError) as e:
                print(f"spotrag api-server: cannot apply {path}: {e}", file=sys.stderr)
                return 1
        if args.kubeconfig_out:
            server.write_kubeconfig(args.kubeconfig_out)
        print(f"Kubernetes API stand-in listening on {server.url}", flush=True)
        _wait_for_signals((signal.SIGINT, signal.SIGTERM))
        return 0
    finally:
        server.stop()


def _wait_for_signals(signals: Iterable[signal.Signals]) -> None:
    stop = threading.Event()
    for signum in signals:
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
