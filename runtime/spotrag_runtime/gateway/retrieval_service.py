"""Retrieval for the gateway: questions embedded in micro-batches on one
worker thread, searched in the loaded faiss index, which is swapped for a new
version without a restart.

Micro-batching: questions that arrive while the worker is busy wait in a
queue and are embedded together in its next batch (up to ``maxBatchSize``).
A lone question goes at once, so batching adds no delay when the gateway is
quiet and saves most of the per-call overhead when it is busy. The event loop
never runs torch or faiss.

Hot swap: every ``reloadIntervalSeconds`` the index root's ``CURRENT`` is
read; a new version is loaded on another thread, checked against the
embedder, and swapped in between two batches. A search in flight finishes on
the index it started with, so no request is dropped. A version that fails to
load is logged and skipped (the old one keeps serving) until ``CURRENT``
changes again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spotrag_runtime.gateway.config import RetrievalConfig
from spotrag_runtime.gateway.errors import Unavailable
from spotrag_runtime.gateway.metrics import GatewayMetrics, IndexState
from spotrag_runtime.retrieval import (
    Embedder,
    IndexNotFoundError,
    IndexStoreError,
    LoadedIndex,
    Passage,
    current_version,
    set_torch_threads,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievedPassage:
    passage: Passage
    score: float
    tokens: int  # counted with the embedding model's tokenizer, for the context budget


@dataclass
class _Question:
    text: str
    top_k: int
    score_threshold: float | None
    future: asyncio.Future[list[RetrievedPassage]]


class RetrievalService:
    def __init__(
        self,
        config: RetrievalConfig,
        *,
        metrics: GatewayMetrics,
        embedder: Embedder | None = None,
        index_path: str | None = None,
    ) -> None:
        self.config = config
        self.index_path = index_path or config.index_path
        self._metrics = metrics
        self._embedder = embedder
        self._index: LoadedIndex | None = None
        self._failed_version: str | None = None
        self._pending: asyncio.Queue[_Question] = asyncio.Queue()
        # One thread embeds and searches (torch and faiss each use their own
        # threads inside); another loads new index versions meanwhile.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotrag-retrieval")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotrag-index-loader")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def index(self) -> LoadedIndex | None:
        return self._index

    @property
    def ready(self) -> bool:
        return self._embedder is not None and self._index is not None

    def index_state(self) -> IndexState | None:
        index = self._index
        if index is None:
            return None
        return IndexState(version=index.version, model=index.manifest.model, passages=index.size)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._embedder is None:
            self._embedder = await loop.run_in_executor(self._loader, self._load_embedder)
        await self._reload_if_changed()
        self._tasks = [
            asyncio.create_task(self._batch_loop(), name="spotrag-retrieval-batches"),
            asyncio.create_task(self._reload_loop(), name="spotrag-index-reload"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._pending.empty():
            question = self._pending.get_nowait()
            if not question.future.done():
                question.future.set_exception(Unavailable("The gateway is shutting down."))
        self._worker.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    async def search(
        self, question: str, *, top_k: int | None = None, score_threshold: float | None = None
    ) -> list[RetrievedPassage]:
        """The best passages for a question, best first: at most ``top_k`` (default
        from the config), none scoring under ``score_threshold`` (likewise)."""
        if not self.ready:
            raise Unavailable("The document index is not loaded yet; retry shortly.", code="index_not_ready")
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        future: asyncio.Future[list[RetrievedPassage]] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait(_Question(question, top_k or self.config.top_k, threshold, future))
        return await future

    # --- the worker ------------------------------------------------------------

    def _load_embedder(self) -> Embedder:
        set_torch_threads(self.config.torch_threads)
        device = None if self.config.device == "auto" else self.config.device
        return Embedder(
            self.config.embedding_model,
            query_prefix=self.config.query_prefix,
            passage_prefix=self.config.passage_prefix,
            device=device,
            batch_size=self.config.max_batch_size,
        )

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.config.max_batch_size and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            batch = [question for question in batch if not question.future.cancelled()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._worker, self._run_batch, batch)
            except Exception as error:
                log.exception("retrieval batch of %d failed", len(batch))
                for question in batch:
                    if not question.future.done():
                        question.future.set_exception(error)
                continue
            for question, passages in zip(batch, results, strict=False):
                if not question.future.done():
                    question.future.set_result(passages)

    def _run_batch(self, batch: Sequence[_Question]) -> list[list[RetrievedPassage]]:
        embedder, index = self._embedder, self._index
        assert embedder is not None and index is not None  # ready() was checked before queuing
        started = time.perf_counter()
        vectors = embedder.embed_queries([question.text for question in batch])
        embedded = time.perf_counter()
        widest = max(question.top_k for question in batch)
        hits_per_question = index.search(vectors, widest)
        searched = time.perf_counter()
        results = []
        for question, hits in zip(batch, hits_per_question, strict=False):
            threshold = question.score_threshold
            kept = [hit for hit in hits[: question.top_k] if threshold is None or hit.score >= threshold]
            results.append(
                [RetrievedPassage(hit.passage, hit.score, embedder.count_tokens(hit.passage.text)) for hit in kept]
            )
        self._metrics.retrieval_batch_size.observe(len(batch))
        # Each question in the batch waited for the whole batch: that is its latency.
        for _ in batch:
            self._metrics.retrieval_embed.observe(embedded - started)
            self._metrics.retrieval_search.observe(searched - embedded)
        return results

    # --- hot swap ----------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_seconds)
            try:
                await self._reload_if_changed()
            except Exception:
                log.exception("checking %s for a new index version failed", self.index_path)

    async def _reload_if_changed(self) -> None:
        loop = asyncio.get_running_loop()
        version = await loop.run_in_executor(self._loader, current_version, self.index_path)
        loaded = self._index.version if self._index else None
        if version is None and loaded is None:
            # Either nothing is published yet, or the root is itself a version folder.
            pass
        elif version is None or version == loaded or version == self._failed_version:
            return
        try:
            index = await loop.run_in_executor(self._loader, self._load_index)
        except IndexNotFoundError as error:
            if loaded is None:
                log.warning("no index yet (%s); retrying every %gs", error, self.config.reload_interval_seconds)
            return
        except IndexStoreError as error:
            self._failed_version = version
            log.error("index version %s not loaded: %s (still serving %s)", version, error, loaded)
            return
        self._index = index
        self._failed_version = None
        log.info("serving index version %s (%d passages, %s)", index.version, index.size, index.manifest.index_type)

    def _load_index(self) -> LoadedIndex:
        index = LoadedIndex.load(self.index_path)
        assert self._embedder is not None
        index.check_compatible(self._embedder)
        return index
