"""The box's container runtime: a container becomes a local process.

There are no images here, so a container runs only when the box knows what
its image is:

- the upstream vLLM server (command ``vllm serve`` or a vllm image) runs as
  the engine emulator (``spotrag engine-emulator``), with the flags it
  shares with vLLM taken from the container's args (--served-model-name,
  --max-model-len, --shutdown-timeout, --max-num-seqs, ...); the image-pull
  and model-load delays come from the box's Timing;
- a ``spotrag ...`` command (the spotrag runtime image) runs as that same
  command from this installation.

Anything else fails to start with a CreateContainerError that says so.

Every pod gets an address of its own in 127.0.0.0/8 (on Linux all of it
is loopback), so a container listens on its pod IP and its own container
port, and anything that reaches pods by podIP:port (the gateway through
EndpointSlices, the operator reading an engine's /metrics) works unchanged.
Container paths are mapped to folders under the pod's directory: ConfigMap,
Secret and emptyDir volumes are materialised there, claims map to the
folders the cluster was given. Paths in args, env values and JSON files
projected from ConfigMaps are rewritten to those folders, since a process
here has no mount namespace of its own. A pod's service-account credentials
are the box's kubeconfig ($KUBECONFIG).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .node_pools import Timing

TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the Kubernetes default
SPOTRAG_CLI = [sys.executable, "-m", "spotrag_runtime.cli"]
ENGINE_EMULATOR = [sys.executable, "-m", "spotrag_runtime.engine_emulator"]

# vLLM flags the emulator understands too: (vLLM flag, emulator flag).
SHARED_ENGINE_FLAGS = {
    "--served-model-name": "--served-model-name",
    "--max-model-len": "--max-model-len",
    "--shutdown-timeout": "--shutdown-timeout",
    "--max-num-seqs": "--max-num-seqs",
    "--block-size": "--block-size",
    "--num-gpu-blocks-override": "--num-gpu-blocks-override",
    "--seed": "--seed",
}


class ContainerConfigError(Exception):
    """The pod refers to something that is missing (CreateContainerConfigError): retried."""


class ContainerError(Exception):
    """The box cannot run this container at all (CreateContainerError)."""


@dataclass
class PreparedContainer:
    """A container, ready to start as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    pod_ip: str
    port_names: dict[str, int]  # port name → containerPort
    # Listening sockets handed to the process (the engine's port, bound already).
    bound_sockets: list[socket.socket] = field(default_factory=list)
    kind: str = "process"
    # Where the process may write its termination message (terminationMessagePath).
    termination_message: Path | None = None

    def resolve_port(self, port: int | str | None) -> int | None:
        """A probe's or hook's port (a number, or a port name) as a number."""
        if isinstance(port, int):
            return port
        if isinstance(port, str) and port.isdigit():
            return int(port)
        return self.port_names.get(port or "")

    def close_sockets(self) -> None:
        for sock in self.bound_sockets:
            sock.close()
        self.bound_sockets.clear()


def bound_socket(ip: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.set_inheritable(True)
    return sock


def ports_free(ip: str, ports: list[int]) -> bool:
    """Whether every port can be listened on at `ip` (another box or a
    wildcard listener on this machine may hold one)."""
    for port in ports:
        try:
            with bound_socket(ip, port) as sock:
                sock.listen()
        except OSError:
            return False
    return True


def declared_ports(pod: dict) -> list[int]:
    return sorted(
        {p["containerPort"] for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []}
    )


@dataclass(frozen=True)
class Mounts:
    """Container path → host path, longest mount path first."""

    table: tuple[tuple[str, str], ...]

    def translate(self, path: str) -> str:
        for container_path, host_path in self.table:
            if path == container_path:
                return host_path
            if path.startswith(container_path.rstrip("/") + "/"):
                return host_path + path[len(container_path.rstrip("/")) :]
        return path

    def translate_text(self, text: str) -> str:
        """Paths inside an argument such as --config=/etc/x.json."""
        if text.startswith("/"):
            return self.translate(text)
        flag, sep, value = text.partition("=")
        if sep and value.startswith("/"):
            return f"{flag}={self.translate(value)}"
        return text

    def translate_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.translate(value) if value.startswith("/") else value
        if isinstance(value, list):
            return [self.translate_json(v) for v in value]
        if isinstance(value, dict):
            return {k: self.translate_json(v) for k, v in value.items()}
        return value


# How the runtime reads a ConfigMap or Secret: fetch(kind, namespace, name), None if absent.
Fetch = Callable[[str, str, str], Awaitable[dict | None]]


class LocalRuntime:
    def __init__(
        self,
        *,
        workdir: Path,
        kubeconfig: str,
        claim_paths: dict[str, str],
        timing: Timing,
        spotrag_command: list[str] | None = None,
    ):
        self.workdir = workdir
        # What a `spotrag` container runs: this installation's CLI unless told otherwise.
        self.spotrag_command = list(spotrag_command or SPOTRAG_CLI)
        self.kubeconfig = kubeconfig
        self.claim_paths = dict(claim_paths)
        self.timing = timing

    def pod_dir(self, pod: dict) -> Path:
        meta = pod["metadata"]
        return self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def claim_path(self, namespace: str, claim: str) -> Path:
        configured = self.claim_paths.get(f"{namespace}/{claim}")
        path = Path(configured) if configured else self.workdir / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, pod: dict, container: str) -> Path:
        return self.pod_dir(pod) / "logs" / f"{container}.log"

    async def prepare(self, pod: dict, container: dict, fetch: Fetch, pod_ip: str) -> PreparedContainer:
        """Materialise volumes and translate the container into a command.

        `fetch(kind, namespace, name)` reads a ConfigMap or Secret (None if absent).
        """
        namespace = pod["metadata"]["namespace"]
        mounts = await self._mounts(pod, container, fetch)
        port_names = {p["name"]: p["containerPort"] for p in container.get("ports") or [] if p.get("name")}
        command = list(container.get("command") or []) + list(container.get("args") or [])
        env = self._base_env(pod, mounts)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = mounts.translate_text(str(item["value"]))
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                env[item["name"]] = await self._secret_value(fetch, namespace, ref)
            elif ref := (item.get("valueFrom") or {}).get("configMapKeyRef"):
                env[item["name"]] = await self._config_value(fetch, namespace, ref)
        image = container.get("image") or ""
        if command[:2] == ["vllm", "serve"] or (not command and "vllm" in image):
            prepared = self._engine(
                container, command[2:] if command[:2] == ["vllm", "serve"] else command, env, port_names, pod_ip
            )
        elif command[:1] == ["spotrag"]:
            prepared = self._spotrag(container, command[1:], env, port_names, mounts, pod_ip)
        else:
            raise ContainerError(
                f"the cluster in a box runs only vLLM (`vllm serve`) and spotrag (`spotrag ...`) containers; "
                f"container {container['name']!r} has image {image!r} and command {command[:3]!r}"
            )
        prepared.termination_message = Path(
            mounts.translate(container.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH)
        )
        return prepared

    def _base_env(self, pod: dict, mounts: Mounts) -> dict[str, str]:
        home = self.pod_dir(pod) / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            # In-cluster credentials: the box's kubeconfig stands in for the
            # service-account token a real kubelet mounts.
            "KUBECONFIG": self.kubeconfig,
            # The box has no network: models come from installed packages.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HOSTNAME": pod["metadata"]["name"],
            "POD_NAME": pod["metadata"]["name"],
            "POD_NAMESPACE": pod["metadata"]["namespace"],
        }
        tmp = mounts.translate("/tmp")
        env["TMPDIR"] = tmp if tmp != "/tmp" else str(home)
        return env

    def _engine(
        self, container: dict, vllm_args: list[str], env: dict[str, str], port_names: dict[str, int], pod_ip: str
    ) -> PreparedContainer:
        options = _flag_values(vllm_args)
        model = next((a for a in vllm_args if not a.startswith("-")), None)
        container_port = int(options.get("--port", "8000"))
        # Bound here and inherited: the port is the pod's from the first instant.
        sock = bound_socket(pod_ip, container_port)
        argv = [*ENGINE_EMULATOR, "--host", pod_ip, "--port", str(container_port), "--fd", str(sock.fileno())]
        if "--served-model-name" not in options and model:
            argv += ["--served-model-name", model]
        for vllm_flag, emulator_flag in SHARED_ENGINE_FLAGS.items():
            if vllm_flag in options:
                argv += [emulator_flag, options[vllm_flag]]
        timing = self.timing
        argv += [
            "--startup-delay",
            str(timing.model_load),
            "--ttft-ms",
            str(timing.engine_ttft_ms),
            "--itl-ms",
            str(timing.engine_itl_ms),
            "--answer-words",
            timing.engine_answer_words,
        ]
        if options.get("--enable-sleep-mode") == "true":
            # vLLM's sleep mode: wake as measured (0.80 s), the first sleep shortened like the model load.
            argv += ["--enable-sleep-mode", "--sleep-seconds", str(timing.model_load), "--wake-seconds", "0.8"]
        return PreparedContainer(
            name=container["name"],
            argv=argv,
            env=env,
            pod_ip=pod_ip,
            port_names=port_names or {"http": container_port},
            bound_sockets=[sock],
            kind="engine",
        )

    def _spotrag(
        self,
        container: dict,
        args: list[str],
        env: dict[str, str],
        port_names: dict[str, int],
        mounts: Mounts,
        pod_ip: str,
    ) -> PreparedContainer:
        translated: list[str] = []
        previous = ""
        for arg in args:
            # 0.0.0.0 in a pod is "every address of the pod": here, the pod IP.
            arg = pod_ip if previous == "--host" else mounts.translate_text(arg)
            translated.append(arg)
            previous = arg if arg.startswith("--") else ""
        return PreparedContainer(
            name=container["name"],
            argv=[*self.spotrag_command, *translated],
            env=env,
            pod_ip=pod_ip,
            port_names=port_names,
        )

    # Volumes -------------------------------------------------------------

    async def _mounts(self, pod: dict, container: dict, fetch: Fetch) -> Mounts:
        namespace = pod["metadata"]["namespace"]
        volumes_dir = self.pod_dir(pod) / "volumes"
        volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
        table: list[tuple[str, str]] = []
        projected: list[tuple[Path, dict[str, str]]] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ContainerConfigError(f"volumeMount {mount['name']!r} names no volume of the pod")
            host = volumes_dir / mount["name"]
            if "persistentVolumeClaim" in volume:
                host = self.claim_path(namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume:
                config_map = await fetch("ConfigMap", namespace, volume["configMap"]["name"])
                if config_map is None:
                    raise ContainerConfigError(f'configmap "{volume["configMap"]["name"]}" not found')
                projected.append((host, _selected(dict(config_map.get("data") or {}), volume["configMap"])))
            elif "secret" in volume:
                secret = await fetch("Secret", namespace, volume["secret"]["secretName"])
                if secret is None:
                    raise ContainerConfigError(f'secret "{volume["secret"]["secretName"]}" not found')
                data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
                data |= dict(secret.get("stringData") or {})
                projected.append((host, _selected(data, volume["secret"])))
            elif "emptyDir" in volume:
                host.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                # One folder per simulated node: what a pod leaves there, the next pod on that node finds.
                node = (pod.get("spec") or {}).get("nodeName") or "unscheduled"
                host = self.workdir / "nodes" / node / volume["hostPath"]["path"].strip("/")
                host.mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(set(volume) - {"name"})
                raise ContainerError(f"volume {mount['name']!r} is of a kind the box does not provide: {kinds}")
            target = host / mount["subPath"] if mount.get("subPath") else host
            table.append((mount["mountPath"], str(target)))
        # The file a container may leave its termination message in, as a kubelet provides it.
        message_file = self.pod_dir(pod) / "termination" / container["name"]
        message_file.parent.mkdir(parents=True, exist_ok=True)
        message_file.write_text("")
        table.append((container.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH, str(message_file)))
        mounts = Mounts(tuple(sorted(table, key=lambda pair: -len(pair[0]))))
        for folder, files in projected:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for name, text in files.items():
                (folder / name).write_text(_translate_file(name, text, mounts))
        return mounts

    async def _secret_value(self, fetch: Fetch, namespace: str, ref: dict) -> str:
        secret = await fetch("Secret", namespace, ref["name"])
        if secret is None or ref["key"] not in (secret.get("data") or {}):
            if ref.get("optional"):
                return ""
            raise ContainerConfigError(f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    async def _config_value(self, fetch: Fetch, namespace: str, ref: dict) -> str:
        config_map = await fetch("ConfigMap", namespace, ref["name"])
        if config_map is None or ref["key"] not in (config_map.get("data") or {}):
            if ref.get("optional"):
                return ""
            raise ContainerConfigError(f"couldn't find key {ref['key']} in ConfigMap {namespace}/{ref['name']}")
        return config_map["data"][ref["key"]]


def _selected(data: dict[str, str], source: dict) -> dict[str, str]:
    """The keys a ConfigMap/Secret volume projects (all, or its `items`)."""
    items = source.get("items")
    if not items:
        return data
    return {item.get("path") or item["key"]: data[item["key"]] for item in items if item["key"] in data}


def _translate_file(name: str, text: str, mounts: Mounts) -> str:
    if not name.endswith(".json"):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return json.dumps(mounts.translate_json(value), indent=2)


def _flag_values(args: list[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs of a command line (last wins)."""
    values: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("--"):
            flag, sep, value = arg.partition("=")
            if sep:
                values[flag] = value
            elif index + 1 < len(args) and not args[index + 1].startswith("--"):
                values[flag] = args[index + 1]
                index += 1
            else:
                values[flag] = "true"
        index += 1
    return values
