"""The gateway's retrieval service with the real MiniLM model and real faiss
indexes: micro-batching, swapping to a new index version under load, refusing
an incompatible one, and readiness while no index exists yet."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
from pathlib import Path

import httpx
import pytest

from spotrag_box.testing import eventually_async
from spotrag_runtime.gateway.config import RetrievalConfig
from spotrag_runtime.gateway.metrics import GatewayMetrics
from spotrag_runtime.gateway.retrieval_service import RetrievalService
from spotrag_runtime.index import SAMPLE_CORPUS_DIR, build_index
from spotrag_runtime.retrieval import LoadedIndex

from .gateway_fixtures import RunningGateway, corpus_index, gateway_config, sample_questions, shared_embedder

HANDBOOK = SAMPLE_CORPUS_DIR / "handbook"
WIND_QUESTION = "At what wind speed are sailings cancelled?"


def corpus(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / f"corpus-{len(names)}"
    folder.mkdir()
    for name in names:
        shutil.copy(HANDBOOK / name, folder / name)
    return folder


def service_for(root: Path, metrics: GatewayMetrics | None = None, **config) -> RetrievalService:
    return RetrievalService(
        RetrievalConfig(index_path=str(root), reload_interval_seconds=0.05, **config),
        metrics=metrics or GatewayMetrics(),
        embedder=shared_embedder(),
    )


async def test_concurrent_questions_are_embedded_in_batches_with_the_same_results() -> None:
    metrics = GatewayMetrics()
    service = service_for(corpus_index(), metrics)
    await service.start()
    try:
        questions = [sample.question for sample in sample_questions()[:16]]
        together = await asyncio.gather(*(service.search(question) for question in questions))
        batches = metrics.registry.get_sample_value("spotrag_retrieval_batch_size_count")
        assert metrics.registry.get_sample_value("spotrag_retrieval_batch_size_sum") == 16
        assert batches < 16  # questions that arrived while the worker was busy went together
        one_by_one = [await service.search(question) for question in questions]
    finally:
        await service.close()
    # Batched and single embeddings run different BLAS kernels, so scores may differ in
    # the last float32 bits: the same passages, each score within 1e-4 of the other.
    assert [[p.passage.id for p in hits] for hits in together] == [[p.passage.id for p in hits] for hits in one_by_one]
    for batched, single in zip(together, one_by_one, strict=True):
        assert [p.score for p in batched] == pytest.approx([p.score for p in single], abs=1e-4)
    # The same ranking a direct faiss search of the same index gives.
    index = LoadedIndex.load(corpus_index())
    direct = index.search(shared_embedder().embed_queries(questions), 4, score_threshold=0.0)
    assert [[p.passage.id for p in hits] for hits in together] == [[h.passage.id for h in hits] for hits in direct]
    assert all(p.tokens == shared_embedder().count_tokens(p.passage.text) for hits in together for p in hits)


async def test_top_k_and_score_threshold_narrow_the_results() -> None:
    service = service_for(corpus_index(), top_k=2, score_threshold=0.3)
    await service.start()
    try:
        default = await service.search(WIND_QUESTION)
        wider = await service.search(WIND_QUESTION, top_k=6, score_threshold=-1.0)
        strict = await service.search(WIND_QUESTION, score_threshold=0.99)
    finally:
        await service.close()
    assert len(default) == 2 and all(p.score >= 0.3 for p in default)
    assert len(wider) == 6 and [p.passage.id for p in wider[:2]] == [p.passage.id for p in default]
    assert strict == []


async def test_a_new_index_version_is_swapped_in_without_dropping_a_search(tmp_path: Path, caplog) -> None:
    root = tmp_path / "index"
    first = build_index([corpus(tmp_path, "pets-onboard.md", "fleet.md")], root, embedder=shared_embedder())
    service = service_for(root)
    await service.start()
    answered: list[str] = []
    stop = asyncio.Event()

    async def keep_asking() -> None:
        while not stop.is_set():
            hits = await service.search(WIND_QUESTION)
            answered.append(hits[0].passage.source)
            await asyncio.sleep(0)

    asker = asyncio.create_task(keep_asking())
    try:
        await eventually_async(lambda: len(answered) >= 3, what="searches on the first version")
        assert service.index.version == first.version
        assert "weather-cancellation-policy.md" not in answered
        grown = corpus(tmp_path, "pets-onboard.md", "fleet.md", "weather-cancellation-policy.md")
        second = await asyncio.to_thread(build_index, [grown], root, embedder=shared_embedder())
        await eventually_async(lambda: service.index.version == second.version, what="the second version to be loaded")
        seen = len(answered)
        await eventually_async(lambda: len(answered) > seen + 2, what="searches on the second version")

        # A version built with other prefixes would give vectors that do not compare:
        # it is refused and the second one keeps serving.
        prefixed = copy.copy(shared_embedder())
        prefixed.query_prefix, prefixed.passage_prefix = "query: ", "passage: "
        with caplog.at_level(logging.ERROR, logger="spotrag_runtime.gateway.retrieval_service"):
            third = await asyncio.to_thread(build_index, [grown], root, embedder=prefixed)
            await eventually_async(lambda: "not loaded" in caplog.text, what="the third version to be refused")
        assert f"index version {third.version} not loaded" in caplog.text
        assert "query_prefix" in caplog.text
        assert service.index.version == second.version
    finally:
        stop.set()
        await asker
        await service.close()
    # Every search got an answer; the last ones found the passage the new version added.
    assert answered[-1].endswith("weather-cancellation-policy.md")


async def test_a_gateway_without_an_index_is_not_ready_until_one_is_published(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    config = gateway_config(["http://127.0.0.1:9"], retrieval={"indexPath": str(root)})
    with RunningGateway(config) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503
            assert "the document index is not loaded" in not_ready.json()["error"]["message"]
            query = await http.post("/v1/rag/query", json={"question": WIND_QUESTION, "generate": False})
            assert query.status_code == 503 and query.json()["error"]["code"] == "index_not_ready"
            await asyncio.to_thread(
                build_index, [corpus(tmp_path, "weather-cancellation-policy.md")], root, embedder=shared_embedder()
            )

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually_async(ready, what="the gateway to load the published index")
            query = await http.post("/v1/rag/query", json={"question": WIND_QUESTION, "generate": False})
            assert query.status_code == 200
            assert query.json()["passages"][0]["source"].endswith("weather-cancellation-policy.md")
