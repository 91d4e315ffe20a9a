"""The kubelet of every simulated node: runs the containers of the pods
bound to them as local processes (see containers.py), reports their status,
and stops them the way a kubelet does.

Lifecycle of a pod:

1. bound → the pod gets an IP of its own in 127.0.0.0/8 (free for every
   port it declares), Pending / ContainerCreating for the image-pull delay,
   then the process starts on that IP: Running, podIP;
2. the pod's own startup and readiness probes (httpGet) against the
   process, at the box's probe period when the pod's is longer; a container
   that exits is restarted with a doubling back-off (restartPolicy Always /
   OnFailure) and counted in restartCount;
3. deletion, as a kubelet does it: the API server keeps a deleted pod that is
   bound to a node (deletionTimestamp and deletionGracePeriodSeconds set)
   until its kubelet confirms; the kubelet runs the preStop hook (``sleep N``,
   or an httpGet), sends SIGTERM, sends SIGKILL when the grace period is
   over, then deletes the pod with gracePeriodSeconds=0, which lets it go;
4. node gone (the cloud terminated the instance): the processes die at once
   (SIGKILL) and, as the pod garbage collector does, pods bound to a node
   that no longer exists are deleted with gracePeriodSeconds=0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from spotrag_runtime.kube import AsyncKube, Informer, KubeError, object_path

from .containers import (
    ContainerConfigError,
    ContainerError,
    LocalRuntime,
    PreparedContainer,
    bound_socket,
    declared_ports,
    ports_free,
)
from .controller import Controller, EventRecorder, now_iso
from .node_pools import SIMULATED_LABEL, Timing

log = logging.getLogger(__name__)

HOST_IP = "127.0.0.1"  # every simulated node is this machine
DEFAULT_GRACE_SECONDS = 30
MIN_GRACE_AFTER_PRESTOP = 2  # what a kubelet grants after a preStop hook used up the grace period
MAX_BACKOFF_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 1.0


def pod_ref(pod: dict) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


@dataclass
class ContainerState:
    """What the kubelet knows of one container, rendered into containerStatuses."""

    spec: dict
    prepared: PreparedContainer | None = None
    process: subprocess.Popen | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    started_at: str | None = None
    terminated: dict | None = None
    last_terminated: dict | None = None
    restarts: int = 0
    started: bool = False
    ready: bool = False
    probe_failures: int = 0
    backoff: float = 0.0
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict:
        state: dict[str, Any]
        if self.alive:
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason} | ({"message": message} if message else {})}
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": state,
        }
        if self.last_terminated:
            status["lastState"] = {"terminated": self.last_terminated}
        return status


class PodWorker:
    """Runs one pod from binding to removal."""

    def __init__(self, kubelet: Kubelet, pod: dict):
        self.kubelet = kubelet
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.node = pod["spec"]["nodeName"]
        self.containers = [ContainerState(spec=c) for c in pod["spec"].get("containers") or []]
        self.deleting = asyncio.Event()
        self.vanished = False  # the object is gone: no more API writes
        self.crashed = False
        self.start_time = now_iso()
        self._transitions: dict[str, tuple[str, str]] = {}
        self._published: dict | None = None
        self.pod_ip = kubelet.ips.allocate(declared_ports(pod))
        self.task = asyncio.create_task(self._run(), name=f"pod {pod_ref(pod)}")

    @property
    def done(self) -> bool:
        return self.task.done()

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def object_gone(self) -> None:
        """Removed without waiting for us (force-deleted)."""
        self.vanished = True
        self.deleting.set()

    def kill_now(self) -> None:
        """The node's instance is gone: nothing runs on it any more."""
        self.vanished = True
        for container in self.containers:
            _signal(container.process, signal.SIGKILL)
        self.task.cancel()

    # Lifecycle -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            if not self.deleting.is_set():
                await self._publish()
                if not await self._sleep_unless_deleted(self.kubelet.timing.image_pull):
                    await self._supervise()
            await self._terminate()
            await self._release()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A fault of the simulation itself: say so loudly, leave nothing running,
            # and keep the pod as it is (no restart loop around a bug).
            log.exception("%s: the simulated kubelet failed on this pod", pod_ref(self.pod))
            self.crashed = True
        finally:
            for container in self.containers:
                _signal(container.process, signal.SIGKILL)
                if container.prepared:
                    container.prepared.close_sockets()
                _reap(container.process)
            self.kubelet.ips.release(self.pod_ip)

    async def _sleep_unless_deleted(self, seconds: float) -> bool:
        """Sleep; True if deletion started meanwhile."""
        try:
            async with asyncio.timeout(seconds):
                await self.deleting.wait()
            return True
        except TimeoutError:
            return False

    async def _supervise(self) -> None:
        period = self.kubelet.timing.probe_period
        while not self.deleting.is_set():
            loop_time = asyncio.get_running_loop().time()
            for container in self.containers:
                await self._tend(container, loop_time)
            await self._probe_all()
            await self._publish()
            await self._sleep_unless_deleted(period)

    async def _tend(self, container: ContainerState, loop_time: float) -> None:
        """Start a container that should run, note one that exited."""
        if container.alive:
            return
        if container.process is not None:  # it exited on its own
            code = container.process.returncode
            container.terminated = _terminated(container, code, self.kubelet.runtime.log_path(self.pod, container.name))
            container.last_terminated = container.terminated
            container.process = None
            container.ready = container.started = False
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "%s container %s exited with %s",
                pod_ref(self.pod),
                container.name,
                code,
            )
            if not _restarts(self.pod, code):
                return
            container.backoff = min(MAX_BACKOFF_SECONDS, container.backoff * 2 or self.kubelet.timing.restart_backoff)
            container.restart_at = loop_time + container.backoff
            container.waiting = (
                "CrashLoopBackOff",
                f"back-off {container.backoff:.0f}s restarting failed container={container.name} pod={self.pod['metadata']['name']}",
            )
            container.terminated = None
            container.restarts += 1
            await self.kubelet.events.record(
                _as_pod(self.pod), "Warning", "BackOff", f"Back-off restarting failed container {container.name}"
            )
            return
        if container.terminated is not None and container.restart_at is None:
            return  # finished for good
        if container.restart_at is not None and loop_time < container.restart_at:
            return
        await self._start(container)

    async def _start(self, container: ContainerState) -> None:
        runtime = self.kubelet.runtime
        try:
            prepared = await runtime.prepare(self.pod, container.spec, self.kubelet.fetch, self.pod_ip)
        except ContainerConfigError as error:
            container.waiting = ("CreateContainerConfigError", str(error))
            return
        except ContainerError as error:
            container.waiting = ("CreateContainerError", str(error))
            return
        log_path = runtime.log_path(self.pod, container.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            # Started from the cluster's own thread: the launcher's parent-death
            # signal is tied to it, and it lives until the cluster stops.
            process = subprocess.Popen(
                [sys.executable, "-m", "spotrag_box.cluster.launch", str(os.getpid()), "--", *prepared.argv],
                env=prepared.env,
                cwd=prepared.env["HOME"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=[s.fileno() for s in prepared.bound_sockets],
            )
        prepared.close_sockets()  # the child holds the listening socket now
        container.prepared = prepared
        container.process = process
        container.started_at = now_iso()
        container.waiting = None
        container.terminated = None
        container.restart_at = None
        container.started = container.ready = False
        container.probe_failures = 0
        self.kubelet.processes[(self.uid, container.name)] = process
        log.info("%s started %s (pid %d) on %s", pod_ref(self.pod), container.name, process.pid, prepared.pod_ip)
        await self.kubelet.events.record(
            _as_pod(self.pod), "Normal", "Started", f"Started container {container.name} (pid {process.pid})"
        )

    async def _probe_all(self) -> None:
        for container in self.containers:
            if not container.alive or container.prepared is None:
                container.ready = False
                continue
            spec = container.spec
            if not container.started:
                startup = spec.get("startupProbe")
                if startup is None or await self.kubelet.probe(container.prepared, startup):
                    container.started = True
                else:
                    continue
            readiness = spec.get("readinessProbe")
            if readiness is None:
                container.ready = True
                continue
            if await self.kubelet.probe(container.prepared, readiness):
                container.ready = True
                container.probe_failures = 0
            else:
                container.probe_failures += 1
                if container.probe_failures >= int(readiness.get("failureThreshold", 3)):
                    container.ready = False

    async def _terminate(self) -> None:
        """preStop, SIGTERM, then SIGKILL when the grace period is over."""
        running = [c for c in self.containers if c.alive]
        if not running:
            return
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.kubelet.events.record(
            _as_pod(self.pod), "Normal", "Killing", f"Stopping container {', '.join(c.name for c in running)}"
        )
        log.info("%s stopping: preStop, then SIGTERM, grace %ss", pod_ref(self.pod), grace)
        # Probes go on while the pod stops, so endpoints see it stop serving.
        prober = asyncio.create_task(self._probe_while_stopping())
        try:
            await asyncio.gather(*(self._pre_stop(c, deadline) for c in running))
            for container in running:
                _signal(container.process, signal.SIGTERM)
            deadline = max(deadline, loop.time() + MIN_GRACE_AFTER_PRESTOP)
            while any(c.alive for c in running) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for container in running:
                if container.alive:
                    log.warning("%s: %s outlived its grace period; SIGKILL", pod_ref(self.pod), container.name)
                    _signal(container.process, signal.SIGKILL)
            while any(c.alive for c in running):
                await asyncio.sleep(0.02)
            log.info("%s stopped", pod_ref(self.pod))
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        for container in running:
            code = container.process.returncode if container.process else None
            container.terminated = _terminated(container, code, self.kubelet.runtime.log_path(self.pod, container.name))
            container.process = None
            container.ready = False
        await self._publish()

    async def _probe_while_stopping(self) -> None:
        while True:
            await asyncio.sleep(self.kubelet.timing.probe_period)
            await self._probe_all()
            await self._publish()

    async def _pre_stop(self, container: ContainerState, deadline: float) -> None:
        hook = ((container.spec.get("lifecycle") or {}).get("preStop")) or {}
        loop = asyncio.get_running_loop()
        if command := (hook.get("exec") or {}).get("command"):
            seconds = _sleep_seconds(command)
            if seconds is None:
                log.warning(
                    "%s: preStop command %r is not run by the box (only `sleep N` is)", pod_ref(self.pod), command
                )
                return
            await asyncio.sleep(max(0.0, min(seconds, deadline - loop.time())))
        elif (get := hook.get("httpGet")) and container.prepared:
            port = container.prepared.resolve_port(get.get("port"))
            if port:
                try:
                    async with httpx.AsyncClient(timeout=max(0.1, deadline - loop.time())) as http:
                        await http.get(f"http://{self.pod_ip}:{port}{get.get('path', '/')}")
                except httpx.HTTPError as error:
                    log.info("%s: preStop httpGet failed: %s", pod_ref(self.pod), error)
        elif sleep := hook.get("sleep"):
            await asyncio.sleep(max(0.0, min(float(sleep.get("seconds", 0)), deadline - loop.time())))

    # API writes ----------------------------------------------------------

    async def _release(self) -> None:
        """Tell the API server the containers are gone: delete with grace 0."""
        if self.vanished:
            return
        try:
            await self.kubelet.client.delete(self._path(), grace_period_seconds=0, preconditions={"uid": self.uid})
        except KubeError as error:
            if error.status not in (404, 409):  # gone, or a new pod of the same name
                raise

    def _path(self, subresource: str | None = None) -> str:
        meta = self.pod["metadata"]
        return object_path("v1", "pods", meta["name"], meta["namespace"], subresource)

    def _condition(self, kind: str, ok: bool, reason: str = "") -> dict:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now_iso())
        condition = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }
        if not ok and reason:
            condition["reason"] = reason
            condition["message"] = (
                f"containers with unready status: [{' '.join(c.name for c in self.containers if not c.ready)}]"
            )
        return condition

    def _status(self) -> dict:
        ready = bool(self.containers) and all(c.ready for c in self.containers)
        ran = any(c.alive or c.terminated for c in self.containers)
        finished = self.containers and all(
            c.terminated and c.restart_at is None and not c.alive for c in self.containers
        )
        if finished and not self.deleting.is_set():
            phase = (
                "Succeeded"
                if all(c.terminated and c.terminated.get("exitCode") == 0 for c in self.containers)
                else "Failed"
            )
        elif ran or any(c.restarts for c in self.containers):
            phase = "Running"
        else:
            phase = "Pending"
        status = {
            "phase": phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "startTime": self.start_time,
            "qosClass": "Burstable",
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", True),
                self._condition("Ready", ready, "ContainersNotReady"),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if phase != "Pending":
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        return status

    async def _publish(self) -> None:
        if self.vanished:
            return
        status = self._status()
        if status == self._published:
            return
        try:
            await self.kubelet.client.patch(self._path("status"), {"status": status})
            self._published = status
        except KubeError as error:
            if error.status == 404:
                self.object_gone()
                return
            raise


class PodIPs:
    """Pod addresses in 127.0.0.0/8, counted up from a block picked at random
    (so two boxes on one machine rarely meet); an address is skipped while
    any port the pod declares is taken there."""

    def __init__(self) -> None:
        rng = random.Random()
        self._second, self._third = rng.randrange(16, 240), rng.randrange(0, 256)
        self._count = 0
        self._used: set[str] = set()
        probe = f"127.{self._second}.{self._third}.1"
        try:
            bound_socket(probe, 0).close()
        except OSError as error:
            raise OSError(
                f"cannot listen on {probe} ({error}): the box gives each pod a loopback address of 127.0.0.0/8, "
                "which Linux routes to lo; on macOS add aliases first (sudo ifconfig lo0 alias 127.x.y.z up)"
            ) from error

    def allocate(self, ports: list[int]) -> str:
        for _ in range(254 * 256):
            self._count += 1
            third, fourth = divmod(self._count - 1, 254)
            ip = f"127.{self._second}.{(self._third + third) % 256}.{fourth + 1}"
            if ip not in self._used and ports_free(ip, ports):
                self._used.add(ip)
                return ip
        raise RuntimeError(f"no loopback address has ports {ports} free")

    def release(self, ip: str) -> None:
        self._used.discard(ip)


class Kubelet(Controller):
    """One controller standing in for the kubelets of all simulated nodes."""

    name = "kubelet"

    def __init__(self, client: AsyncKube, pods: Informer, nodes: Informer, runtime: LocalRuntime, *, timing: Timing):
        super().__init__(resync=timing.resync)
        self.client = client
        self.pods = pods
        self.nodes = nodes
        self.runtime = runtime
        self.timing = timing
        self.events = EventRecorder(client, "kubelet")
        self.workers: dict[str, PodWorker] = {}
        self.ips = PodIPs()
        # Processes started and not yet seen to exit, for shutdown() to be sure.
        self.processes: dict[tuple[str, str], subprocess.Popen] = {}
        self._http = httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS)
        pods.subscribe(self._on_pod)
        nodes.subscribe(self.wake)

    def _on_pod(self, kind: str, pod: dict) -> None:
        worker = self.workers.get(pod["metadata"].get("uid", ""))
        if worker is not None:
            if kind == "DELETED":
                worker.object_gone()
            else:
                worker.update(pod)
        self.wake()

    async def fetch(self, kind: str, namespace: str, name: str) -> dict | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        return await self.client.get(object_path("v1", plural, name, namespace))

    async def probe(self, prepared: PreparedContainer, probe: dict) -> bool:
        get = probe.get("httpGet")
        if get is None:
            return True  # exec and tcpSocket probes: the process being up is all the box checks
        port = prepared.resolve_port(get.get("port"))
        if port is None:
            return False
        try:
            response = await self._http.get(f"http://{prepared.pod_ip}:{port}{get.get('path', '/')}")
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 400

    def simulated_nodes(self) -> set[str]:
        return {
            n["metadata"]["name"]
            for n in self.nodes.items()
            if (n["metadata"].get("labels") or {}).get(SIMULATED_LABEL) == "true"
        }

    async def reconcile(self) -> None:
        if not (self.pods.synced.is_set() and self.nodes.synced.is_set()):
            return
        nodes = self.simulated_nodes()
        existing = {n["metadata"]["name"] for n in self.nodes.items()}
        present = set()
        for pod in self.pods.items():
            node = (pod.get("spec") or {}).get("nodeName")
            if not node:
                continue
            uid = pod["metadata"]["uid"]
            if node not in existing:
                await self._collect_orphan(pod)
                continue
            if node not in nodes:
                continue  # a node someone else runs
            present.add(uid)
            worker = self.workers.get(uid)
            if worker is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self.workers[uid] = PodWorker(self, pod)
        for uid, worker in list(self.workers.items()):
            if uid not in present and not worker.vanished:
                if worker.node not in nodes:
                    worker.kill_now()
                else:
                    worker.object_gone()
            if worker.done and not (worker.crashed and uid in present):
                del self.workers[uid]
        for key, process in list(self.processes.items()):
            if process.poll() is not None:
                del self.processes[key]

    def node_lost(self, node: str) -> None:
        """The instance is gone: SIGKILL everything on it now."""
        for worker in self.workers.values():
            if worker.node == node:
                worker.kill_now()
        self.wake()

    async def _collect_orphan(self, pod: dict) -> None:
        """What the pod garbage collector does for pods of a deleted node."""
        meta = pod["metadata"]
        try:
            await self.client.delete(
                object_path("v1", "pods", meta["name"], meta["namespace"]),
                grace_period_seconds=0,
                preconditions={"uid": meta["uid"]},
            )
        except KubeError as error:
            if error.status not in (404, 409):
                raise

    async def shutdown(self) -> None:
        """Power off: every process gets SIGKILL (the box is going away)."""
        for worker in list(self.workers.values()):
            worker.kill_now()
        await asyncio.gather(*(w.task for w in self.workers.values()), return_exceptions=True)
        for process in self.processes.values():
            _signal(process, signal.SIGKILL)
            _reap(process)
        await self._http.aclose()


def _as_pod(pod: dict) -> dict:
    return pod | {"apiVersion": "v1", "kind": "Pod"}


def _signal(process: subprocess.Popen | None, sig: int) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _reap(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("process %d did not exit after SIGKILL", process.pid)


def _restarts(pod: dict, exit_code: int) -> bool:
    policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def _terminated(container: ContainerState, exit_code: int | None, log_path: Path) -> dict:
    code = 137 if exit_code is None else (128 - exit_code if exit_code < 0 else exit_code)
    state = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": container.started_at,
        "finishedAt": now_iso(),
    }
    if exit_code is not None and exit_code < 0:
        state["signal"] = -exit_code
    if message := _termination_message(container, code, log_path):
        state["message"] = message
    return state


def _termination_message(container: ContainerState, code: int, log_path: Path) -> str:
    """The file's content (at most 4096 bytes), else, with FallbackToLogsOnError
    and a failure, the log's last 80 lines (at most 2048 bytes), as a kubelet does."""
    prepared = container.prepared
    if prepared is not None and prepared.termination_message is not None and prepared.termination_message.is_file():
        if text := prepared.termination_message.read_bytes()[:4096].decode(errors="replace"):
            return text
    if code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" and log_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-80:])
        return tail.encode()[-2048:].decode(errors="replace")
    return ""


_SLEEP = re.compile(r"^\s*(?:exec\s+)?sleep\s+(\d+(?:\.\d+)?)\s*$")


def _sleep_seconds(command: list[str]) -> float | None:
    """N for `sleep N` or `sh -c "sleep N"`, the preStop hooks the box runs."""
    if len(command) == 2 and Path(command[0]).name == "sleep":
        try:
            return float(command[1])
        except ValueError:
            return None
    if len(command) == 3 and Path(command[0]).name in ("sh", "bash") and command[1] == "-c":
        if match := _SLEEP.match(command[2]):
            return float(match.group(1))
    return None
