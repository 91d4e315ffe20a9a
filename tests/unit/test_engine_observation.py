"""Which engines the operator asks for their load (observe.observe_engines)."""

from __future__ import annotations

import httpx

from spotrag_operator.observe import observe_engines


def engine_pod(name: str, ip: str, *, serving: bool, deleting: bool = False) -> dict:
    meta = {
        "name": name,
        "labels": {"spotrag.io/serving": "true" if serving else "false", "spotrag.io/capacity": "spot"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": "n"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_only_draining_engines_not_yet_being_deleted_are_asked_for_their_load():
    asked = []

    def engine(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        return httpx.Response(200, text="vllm:num_requests_running 2\nvllm:num_requests_waiting 1\n")

    pods = [
        engine_pod("serving", "10.0.0.1", serving=True),
        engine_pod("draining", "10.0.0.2", serving=False),
        # Deleted already, on a node that may be gone: its address would answer
        # nothing until the timeout, on every reconcile, delaying every drain.
        engine_pod("terminating", "10.0.0.3", serving=False, deleting=True),
    ]
    with httpx.Client(transport=httpx.MockTransport(engine)) as client:
        engines = {e.name: e for e in observe_engines(client, pods)}
    assert asked == ["10.0.0.2"]
    assert engines["draining"].running_requests == 3
    assert engines["serving"].running_requests is None and engines["terminating"].running_requests is None
    assert engines["terminating"].terminating
