"""spotrag's one Kubernetes access layer (runtime/spotrag_runtime/kube) against
the API stand-in over HTTP: the list-then-watch loop behind the gateway's
engine discovery and the box's controllers, and the error type."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spotrag_box.apiserver.server import KubeAPIServer
from spotrag_runtime.kube import AsyncKube, Informer, Kube, KubeError, api_client, collection_path, object_path

CONFIGMAPS = collection_path("v1", "configmaps", "default")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeAPIServer, str]]:
    with KubeAPIServer() as server:
        yield server, str(server.write_kubeconfig(tmp_path / "kubeconfig"))


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll until `check()` is truthy; fail naming what never happened."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


def config_map(name: str, value: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": value}}


def lists(server: KubeAPIServer, since: int) -> list[int]:
    """Ids of the plain lists (not watches) of ConfigMaps since `since`."""
    return [
        r.id
        for r in server.requests(since=since)
        if r.method == "GET" and r.path == CONFIGMAPS and r.query.get("watch") != "true"
    ]


async def test_the_informer_lists_through_failures_then_follows_every_change(api) -> None:
    server, kubeconfig = api
    server.inject_faults(method="GET", path_regex=f"^{CONFIGMAPS}$", status=500, times=2)
    client = AsyncKube.from_kubeconfig(kubeconfig)
    informer = Informer(client, CONFIGMAPS, backoff=(0.01, 0.05))
    seen: list[tuple[str, str]] = []
    informer.subscribe(lambda kind, obj: seen.append((kind, obj["metadata"]["name"])))
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        assert len(lists(server, 0)) == 3  # two answered 500, the third listed

        await client.create(CONFIGMAPS, config_map("a", "1"))
        await eventually(lambda: informer.get("default", "a"), "a in the cache")
        await client.patch(object_path("v1", "configmaps", "a", "default"), {"data": {"v": "2"}})
        await eventually(lambda: (informer.get("default", "a") or {}).get("data") == {"v": "2"}, "a modified")
        assert await client.delete(object_path("v1", "configmaps", "a", "default")) is True
        await eventually(lambda: informer.get("default", "a") is None, "a gone")
        assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


@pytest.mark.parametrize("status", [410, 500])
async def test_a_broken_watch_lists_again_and_misses_nothing(api, status: int) -> None:
    server, kubeconfig = api
    # Watches of one second: the loop re-watches often, so the fault below meets a watch.
    client = AsyncKube.from_kubeconfig(kubeconfig, watch_seconds=1)
    informer = Informer(client, CONFIGMAPS, backoff=(0.01, 0.05))
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        mark = server.request_count
        server.inject_faults(method="GET", path_regex=f"^{CONFIGMAPS}$", status=status, times=1)
        await client.create(CONFIGMAPS, config_map("b", "1"))
        await eventually(lambda: lists(server, mark), "a list after the broken watch")
        await eventually(lambda: informer.get("default", "b"), "b in the cache")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def test_errors_carry_status_and_say_the_request_in_rbac_words(api) -> None:
    server, kubeconfig = api
    server.inject_faults(method="POST", path_regex="/poddisruptionbudgets$", status=403, times=1)
    with api_client(kubeconfig) as client:
        kube = Kube(client)
        with pytest.raises(KubeError) as error:
            kube.create(
                {
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": "p", "namespace": "default"},
                    "spec": {"maxUnavailable": 1},
                }
            )
        assert error.value.forbidden
        assert error.value.request() == "create poddisruptionbudgets (policy) in namespace default"
        assert kube.get("v1", "ConfigMap", "missing", "default") is None
        assert kube.delete("v1", "ConfigMap", "missing", "default") is False


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("GET", "/api/v1/namespaces/default/pods", "list pods in namespace default"),
        ("GET", "/api/v1/nodes/n1", "get nodes"),
        (
            "PATCH",
            "/apis/spotrag.io/v1alpha1/namespaces/ns/ragdeployments/r/status",
            "patch ragdeployments/status (spotrag.io) in namespace ns",
        ),
    ],
)
def test_request_wording(method: str, path: str, words: str) -> None:
    assert KubeError(403, "Forbidden", "no", method=method, path=path).request() == words
