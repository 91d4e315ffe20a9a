"""Scale to zero, as a user of a RAGDeployment sees it: with minReplicas 0 and
no on-demand baseline an idle deployment runs no engine (`kubectl get ragd`
says ScaledToZero); the next question is held by the gateway (not refused)
while an engine starts, and answered; once idle again the engine goes, and
the question after that is answered the same way.

The scale-up window is long (60 s) on purpose: from zero the first engine is
asked for at once all the same, because a request is waiting on it. The
scale-down window is short (5 s), so the idle deployment empties quickly.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from spotrag_box.testing import scrape

from .test_interruptions import (
    SERVED_MODEL,
    Request,
    chat,
    engine_selector,
    plain_requests,
    remove_deployment,
    wait_event,
)

pytestmark = pytest.mark.box_only

DEPLOYMENT = "sleepy"
TIMEOUT = 120.0


def _status(e2e, namespace: str) -> dict:
    return (e2e.get_ragdeployment(namespace, DEPLOYMENT) or {}).get("status") or {}


def _ready_reason(e2e, namespace: str) -> str | None:
    conditions = {c["type"]: c for c in _status(e2e, namespace).get("conditions") or []}
    return conditions.get("Ready", {}).get("reason")


def wait_scaled_to_zero(e2e, namespace: str) -> None:
    e2e.wait_for(
        lambda: (
            _ready_reason(e2e, namespace) == "ScaledToZero" and not e2e.pods(namespace, engine_selector(DEPLOYMENT))
        ),
        namespace=namespace,
        timeout=TIMEOUT,
        what=f"no engine left and the status to say ScaledToZero (status: {_status(e2e, namespace).get('engines')})",
    )


def ask(url: str, request: Request) -> tuple[str, str | None]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
    return chat(client, request)


def test_idle_to_zero_engines_and_the_next_question_is_held_then_answered(e2e, namespace):
    manifest = e2e.ragdeployment_manifest(
        namespace,
        DEPLOYMENT,
        retrieval={"enabled": False},
        scaling={
            "minReplicas": 0,
            "maxReplicas": 2,
            "onDemandBaseline": 0,
            "targetQueuedTokensPerReplica": 300,
            "scaleUpStabilizationSeconds": 60,
            "scaleDownStabilizationSeconds": 5,
            "coldStartTimeoutSeconds": 300,
        },
    )
    e2e.apply(manifest)
    try:
        # Nothing asked yet: no engine, and the gateways are ready all the same.
        e2e.wait_ready(namespace, DEPLOYMENT)
        wait_scaled_to_zero(e2e, namespace)
        listed = e2e.kubectl("get", "ragd", DEPLOYMENT, "-n", namespace).stdout
        assert "ScaledToZero" in listed, listed
        first, second = plain_requests(e2e)[:2]
        with e2e.service_url(namespace, DEPLOYMENT) as url:
            # A streamed question at zero engines: held (a 200 and keep-alive comments
            # while it waits), the engine started at once, the answer complete.
            text, finish = ask(url, first)
            assert finish in ("stop", "length") and text
            if first.expected is not None:
                assert text == first.expected
            wait_event(e2e, namespace, "Scaled", "from zero", "0 → 1", deployment=DEPLOYMENT)

            # Idle again: after the scale-down window the engine is drained and deleted.
            wait_scaled_to_zero(e2e, namespace)
            wait_event(e2e, namespace, "Scaled", "1 → 0", deployment=DEPLOYMENT)

            # The next question, not streamed, is held the same way and answered.
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": SERVED_MODEL,
                    "messages": [{"role": "user", "content": second.question}],
                    "max_tokens": second.max_tokens,
                    "rag": False,
                },
                timeout=TIMEOUT,
            )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            metrics = scrape(f"{url}/metrics")
            assert metrics.value("spotrag_requests_total", outcome="success") == 2
            assert metrics.value("spotrag_requests_total", outcome="unavailable") == 0
    finally:
        remove_deployment(e2e, namespace, DEPLOYMENT)
