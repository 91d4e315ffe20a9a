"""Start an engine emulator as a child process, for tests, the box and benchmarks.

The parent binds the listening socket and hands it to the child, so the
port is known before the child starts and no other process can take it in
between (no "find a free port, then hope" race).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .config import EmulatorConfig, config_arguments

DEFAULT_READY_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000


class EmulatorStartError(RuntimeError):
    """The emulator exited or did not become healthy in time; carries its log tail."""


class EmulatorProcess:
    """A running ``python -m spotrag_runtime.engine_emulator`` child."""

    def __init__(self, popen: subprocess.Popen[bytes], host: str, port: int, log_path: Path) -> None:
        self.popen = popen
        self.host = host
        self.port = port
        self.log_path = log_path

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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        """Block until /health answers 200; raise EmulatorStartError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise EmulatorStartError(
                    f"engine emulator exited with {self.popen.returncode} before it was ready:\n"
                    + self.log()[-LOG_TAIL_CHARS:])
            if self.health_status() == 200:
                return
            if time.monotonic() >= deadline:
                raise EmulatorStartError(
                    f"engine emulator at {self.url} not ready after {timeout:.1f}s:\n"
                    + self.log()[-LOG_TAIL_CHARS:])
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM: drain like vLLM (see --shutdown-timeout), then exit."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: vanish mid-request, like a node taken back."""
        if self.popen.poll() is None:
            self.popen.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """Terminate, kill if it takes longer than ``timeout``, and remove the log."""
        self.terminate()
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.wait()
        self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmulatorProcess pid={self.pid} url={self.url} returncode={self.returncode}>"


def start_engine_emulator(port: int | None = None, *, host: str = "127.0.0.1",
                          **options: object) -> EmulatorProcess:
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
        # Listening already: connections made before the child is up wait in the backlog.
        sock.listen(2048)
        bound_port = sock.getsockname()[1]
        log_file = tempfile.NamedTemporaryFile(prefix=f"engine-emulator-{bound_port}-", suffix=".log", delete=False)
        with log_file:
            argv = [sys.executable, "-m", "spotrag_runtime.engine_emulator",
                    "--host", host, "--port", str(bound_port), "--fd", str(sock.fileno()),
                    *config_arguments(config)]
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        sock.close()  # the child holds its own copy
    return EmulatorProcess(popen, host, bound_port, Path(log_file.name))
