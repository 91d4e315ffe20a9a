"""Start an engine emulator as a child process, for tests, the box and benchmarks.

The parent binds the socket and hands it to the child, so the port is known
before the child starts and no other process can take it in between (no
"find a free port, then hope" race). The child listens on it only once it
is ready: until then connections are refused, as vLLM's are while it loads.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import IO

from .config import EmulatorConfig, config_arguments

DEFAULT_READY_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 200


class EmulatorStartError(RuntimeError):
    """The emulator exited or did not become healthy in time; carries its log tail."""


class _OutputTail:
    """The last lines a child printed, read from its pipe by a daemon thread
    (no log files left behind, and the pipe never fills up and blocks it)."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                self.lines.append(line.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.lines)


class EmulatorProcess:
    """A running ``python -m spotrag_runtime.engine_emulator`` child."""

    def __init__(self, popen: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.popen = popen
        self.host = host
        self.port = port
        assert popen.stdout is not None
        self._output = _OutputTail(popen.stdout, name=f"engine-emulator-{port}-output")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        """The last lines the emulator printed (stdout and stderr)."""
        return self._output.text()

    def health_status(self, timeout: float = 1.0) -> int | None:
        """GET /health's status code, or None when nothing answers."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except OSError:
            return None
        finally:
            connection.close()

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until /health answers 200 (connections are refused until then);
        raise EmulatorStartError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise EmulatorStartError(
                    f"engine emulator exited with {self.popen.returncode} before it was ready:\n" + self.log()
                )
            if self.health_status() == 200:
                return
            if time.monotonic() >= deadline:
                raise EmulatorStartError(
                    f"engine emulator at {self.url} not ready after {timeout:.1f}s:\n" + self.log()
                )
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM: drain like vLLM 0.26 (see --shutdown-timeout and the server's doc)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: vanish mid-request, like a node taken back."""
        if self.popen.poll() is None:
            self.popen.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """Terminate, and kill if that takes longer than ``timeout``; returns the exit code."""
        self.terminate()
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.wait()
        return code

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmulatorProcess pid={self.pid} url={self.url} returncode={self.returncode}>"


def start_engine_emulator(port: int | None = None, *, host: str = "127.0.0.1", **options: object) -> EmulatorProcess:
    """Start an emulator child process listening on ``host:port`` (a free port if None).

    ``options`` are EmulatorConfig fields (``served_model_name``, ``seed``,
    ``max_num_seqs``, ``ttft_ms``, ``shutdown_timeout``, ...); they are checked
    here, so a typo fails in the caller rather than in the child. Call
    ``wait_ready()`` before sending requests, and ``stop()`` (or use ``with``)
    when done.
    """
    settable = {field.name for field in dataclasses.fields(EmulatorConfig)} - {"host", "port", "fd"}
    unknown = set(options) - settable
    if unknown:
        raise TypeError(f"unknown engine emulator options: {', '.join(sorted(unknown))}")
    config = EmulatorConfig(host=host, port=port or 0, **options)  # type: ignore[arg-type]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, config.port))
        bound_port = sock.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "spotrag_runtime.engine_emulator",
            "--host",
            host,
            "--port",
            str(bound_port),
            "--fd",
            str(sock.fileno()),
            *config_arguments(config),
        ]
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        sock.close()  # the child holds its own copy
    return EmulatorProcess(popen, host, bound_port)
