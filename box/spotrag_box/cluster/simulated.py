"""SimulatedCluster: the scheduler, kubelets, controllers and cloud of a GPU
cluster, run against a Kubernetes API (the box's stand-in, usually) and
speaking to it only over HTTP, like any controller.

It runs in a thread of its own with its own event loop, so tests and the
demo drive it with plain calls::

    with SimulatedCluster(kubeconfig, workdir=tmp) as cluster:
        ...                                   # kubectl apply, wait for pods
        cluster.interrupt_node("gpu-spot-a-1", style="aws", notice_seconds=20)
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from spotrag_runtime.kube import AsyncKube, Informer, collection_path

from . import leaderworkersets
from .cloud import Cloud, Interruption
from .containers import LocalRuntime
from .deployments import DeploymentController
from .endpointslices import EndpointSliceController
from .jobs import JobController
from .kubelet import Kubelet
from .node_pools import ClusterProfile, Timing
from .scheduler import Scheduler
from .storage import VolumeProvisioner

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 30.0


class ClusterError(Exception):
    """The simulated cluster could not start or do what was asked."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    namespace: str
    pod: str
    container: str
    pid: int


class SimulatedCluster:
    def __init__(
        self,
        kubeconfig: str | Path,
        *,
        profile: ClusterProfile | None = None,
        workdir: str | Path | None = None,
        timing: Timing | None = None,
        claim_paths: dict[str, str | Path] | None = None,
        spotrag_command: list[str] | None = None,
    ):
        """`claim_paths` maps "namespace/claim" to a folder on this machine
        (for example an index built beforehand); other claims get an empty
        folder under `workdir`. `spotrag_command` is what containers running
        `spotrag ...` execute (default: this installation's CLI)."""
        self.kubeconfig = str(kubeconfig)
        self.profile = profile or ClusterProfile.default()
        self.timing = timing or Timing()
        self._own_workdir = tempfile.TemporaryDirectory(prefix="spotrag-box-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._own_workdir.name)
        self.runtime = LocalRuntime(
            workdir=self.workdir,
            kubeconfig=self.kubeconfig,
            claim_paths={k: str(v) for k, v in (claim_paths or {}).items()},
            timing=self.timing,
            spotrag_command=spotrag_command,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.kubelet: Kubelet | None = None
        self.cloud: Cloud | None = None
        self.informers: dict[str, Informer] = {}

    # Lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> SimulatedCluster:
        if self._thread is not None:
            raise ClusterError("the simulated cluster is already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._thread_main, name="spotrag-box-cluster", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        if not self._ready.wait(timeout):
            self.stop()
            raise ClusterError(f"the simulated cluster did not come up in {timeout:.0f}s against {self.kubeconfig}")
        if self._error is not None:
            error = self._error
            self.stop()
            raise ClusterError(f"the simulated cluster could not start: {error}") from error
        return self

    def stop(self) -> None:
        """Stop every controller and SIGKILL every container process."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive() and self._stopping is not None:
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout=30)
        self._thread = None
        atexit.unregister(self.stop)
        if self._own_workdir is not None:
            self._own_workdir.cleanup()

    def __enter__(self) -> SimulatedCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as error:
            self._error = error
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        client = AsyncKube.from_kubeconfig(self.kubeconfig)
        kinds = {
            "nodes": collection_path("v1", "nodes"),
            "pods": collection_path("v1", "pods"),
            "services": collection_path("v1", "services"),
            "endpointslices": collection_path("discovery.k8s.io/v1", "endpointslices"),
            "deployments": collection_path("apps/v1", "deployments"),
            "jobs": collection_path("batch/v1", "jobs"),
            "persistentvolumeclaims": collection_path("v1", "persistentvolumeclaims"),
            "leaderworkersets": collection_path(leaderworkersets.API_VERSION, leaderworkersets.PLURAL),
        }
        # The cluster runs the LeaderWorkerSet controller, so its API is there.
        await leaderworkersets.install_crd(client)
        informers = {name: Informer(client, path, name=name) for name, path in kinds.items()}
        self.informers = informers
        timing = self.timing
        kubelet = Kubelet(client, informers["pods"], informers["nodes"], self.runtime, timing=timing)
        cloud = Cloud(client, informers["nodes"], kubelet, self.profile, timing=timing)
        controllers = [
            Scheduler(client, informers["pods"], informers["nodes"], resync=timing.resync),
            kubelet,
            EndpointSliceController(
                client,
                informers["services"],
                informers["pods"],
                informers["endpointslices"],
                informers["nodes"],
                resync=timing.resync,
            ),
            DeploymentController(client, informers["deployments"], informers["pods"], resync=timing.resync),
            JobController(
                client, informers["jobs"], informers["pods"], resync=timing.resync, retry_delay=timing.restart_backoff
            ),
            VolumeProvisioner(client, informers["persistentvolumeclaims"], self.runtime, resync=timing.resync),
            leaderworkersets.LeaderWorkerSetController(
                client, informers["leaderworkersets"], informers["pods"], resync=timing.resync
            ),
            cloud,
        ]
        self.kubelet, self.cloud = kubelet, cloud
        tasks = [asyncio.create_task(i.run(), name=f"informer {n}") for n, i in informers.items()]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(i.synced.wait() for i in informers.values())), START_TIMEOUT_SECONDS
            )
            await cloud.launch_initial()
            tasks += [asyncio.create_task(c.run(), name=c.name) for c in controllers]
            self._ready.set()
            await self._stopping.wait()
        finally:
            # Controllers first, so none reacts to the shutdown of the others.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await kubelet.shutdown()
            await cloud.shutdown()
            await client.close()

    def _call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_SECONDS) -> Any:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            coroutine.close()
            raise ClusterError("the simulated cluster is not running")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ClusterError(f"the simulated cluster did not answer in {timeout:.0f}s") from None

    # What tests and the demo do to the cluster -------------------------------

    def interrupt_node(self, node: str, *, style: str = "aws", notice_seconds: float = 120.0) -> Interruption:
        """Send a spot interruption notice; the node is gone `notice_seconds` later."""
        assert self.cloud is not None
        return self._call(self.cloud.interrupt(node, style=style, notice_seconds=notice_seconds))

    def terminate_node(self, node: str) -> None:
        """The instance is gone now, without notice."""
        assert self.cloud is not None
        self._call(self.cloud.terminate(node))

    def set_spot_capacity(self, available: bool, zone: str | None = None) -> None:
        """Make spot capacity (un)available in one zone or all: no new spot node starts while it is out."""
        assert self.cloud is not None
        self._call(self.cloud.set_spot_capacity(available, zone))

    def nodes(self) -> dict[str, str]:
        """Live simulated nodes → their pool."""
        assert self.cloud is not None
        return self._call(_snapshot(dict, self.cloud.instances))

    def interruptions(self) -> dict[str, Interruption]:
        """Notices given and not yet carried out, by node."""
        assert self.cloud is not None
        return self._call(_snapshot(dict, self.cloud.interruptions))

    def processes(self) -> list[ProcessInfo]:
        """Container processes running now."""
        assert self.kubelet is not None
        kubelet = self.kubelet

        async def collect() -> list[ProcessInfo]:
            found = []
            for worker in kubelet.workers.values():
                for container in worker.containers:
                    if container.alive and container.process is not None:
                        meta = worker.pod["metadata"]
                        found.append(
                            ProcessInfo(meta["namespace"], meta["name"], container.name, container.process.pid)
                        )
            return found

        return self._call(collect())

    def pod_log(self, namespace: str, pod: str, *, lines: int = 40) -> str:
        """The last lines each container of a pod wrote (what `kubectl logs` would show)."""
        found = sorted((self.workdir / "pods").glob(f"{namespace}_{pod}_*/logs/*.log"))
        chunks = []
        for path in found:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {path.parent.parent.name} {path.stem} ---\n" + "\n".join(tail))
        return "\n".join(chunks)


async def _snapshot(kind: type, value: Any) -> Any:
    return kind(value)
