"""Build the faiss index: the type chosen by size, trained on a sample, tuned to a recall target.

faiss-gpu is used for IVF training and for the exact search that recall is measured
against when the installed faiss has GPU support and sees a GPU; the index written
to disk is always a CPU index, since gateways search on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INDEX_TYPES = ("flat", "hnsw", "ivf")
# Exact search below this many vectors: at 384 dimensions a flat scan of 50k takes a
# few milliseconds per query on one core, and exact needs no training or tuning.
FLAT_MAX_VECTORS = 50_000
# HNSW up to here (no training, best latency at a given recall); IVF above, where
# HNSW's graph build time and memory grow past what an index job should spend.
HNSW_MAX_VECTORS = 2_000_000
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH_CHOICES = (16, 32, 48, 64, 96, 128, 192, 256, 512)
IVF_TRAINING_POINTS_PER_LIST = 50  # faiss wants at least 39 per centroid
IVF_NPROBE_CHOICES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
RECALL_TARGET = 0.95
RECALL_QUERIES = 500
SYNTHETIC_QUERY_COSINE = 0.6
RECALL_K = 10
ADD_BATCH = 4096
SEED = 1234


@dataclass
class VectorIndex:
    index: Any  # a CPU faiss index
    index_type: str
    search_params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float | None = None
    on_gpu: bool = False


def choose_index_type(count: int, requested: str = "auto") -> str:
    if requested == "auto":
        if count < FLAT_MAX_VECTORS:
            return "flat"
        return "hnsw" if count < HNSW_MAX_VECTORS else "ivf"
    if requested not in INDEX_TYPES:
        raise ValueError(f"unknown index type {requested!r}; choose auto, {', '.join(INDEX_TYPES)}")
    return requested


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_list_count(count: int) -> int:
    """About 4·√n lists, fewer when the corpus is too small to train that many centroids."""
    return max(1, min(int(4 * math.sqrt(count)), count // IVF_TRAINING_POINTS_PER_LIST, 65_536))


def build_vector_index(
    vectors: np.ndarray,
    index_type: str,
    *,
    queries: np.ndarray | None = None,
    on_added: Callable[[int], None] | None = None,
    use_gpu: bool | None = None,
) -> VectorIndex:
    """Index normalized `vectors` for inner-product search; approximate types are tuned and measured.

    `queries` (embedded questions) are what recall@10 is measured and tuned on; without
    them, synthetic questions are made from held-out passages (`synthetic_queries`).
    """
    import faiss

    count, dimension = vectors.shape
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    rng = np.random.default_rng(SEED)
    held_out = rng.choice(count, size=min(RECALL_QUERIES, count), replace=False)

    if index_type == "flat":
        index = faiss.IndexFlatIP(dimension)
        _add(index, vectors, on_added)
        return VectorIndex(index, "flat")
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        _add(index, vectors, on_added)
        choices = [("efSearch", value) for value in HNSW_EF_SEARCH_CHOICES]
    elif index_type == "ivf":
        lists = ivf_list_count(count)
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(quantizer, dimension, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere, like the vectors
        # Train on a sample that leaves out the passages the recall queries are made from;
        # a corpus too small for that trains on everything.
        wanted = lists * IVF_TRAINING_POINTS_PER_LIST
        pool = np.setdiff1d(np.arange(count), held_out)
        if len(pool) < wanted:
            pool = np.arange(count)
        sample = rng.choice(pool, size=min(len(pool), wanted), replace=False)
        index = _train_and_fill(index, vectors, np.sort(sample), on_added, use_gpu=use_gpu)
        choices = [("nprobe", value) for value in IVF_NPROBE_CHOICES if value <= lists]
    else:
        raise ValueError(f"unknown index type {index_type!r}")

    if queries is None:
        queries = synthetic_queries(vectors[held_out], rng)
    truth = exact_neighbors(vectors, queries, use_gpu=use_gpu)
    parameters = faiss.ParameterSpace()
    recall = 0.0
    for name, value in choices:
        parameters.set_index_parameter(index, name, value)
        recall = neighbors_recall(index, queries, truth)
        if recall >= RECALL_TARGET:
            break
    return VectorIndex(index, index_type, {name: value}, recall, on_gpu=use_gpu and index_type == "ivf")


def synthetic_queries(
    anchors: np.ndarray, rng: np.random.Generator, *, cosine: float = SYNTHETIC_QUERY_COSINE
) -> np.ndarray:
    """Stand-in questions: each anchor (a passage vector) turned by a random direction to `cosine` from it.

    A passage's own vector is a far easier query than a question is (its nearest
    neighbour is itself, at 1.0), and recall tuned on it is too optimistic for an
    approximate index. The bundled sample's questions sit at 0.29 to 0.77 (median
    0.57) from the passages that answer them.
    """
    noise = rng.standard_normal(anchors.shape).astype(np.float32)
    noise -= (noise * anchors).sum(axis=1, keepdims=True) * anchors  # orthogonal to the anchor
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    queries = cosine * anchors + math.sqrt(1 - cosine**2) * noise
    return np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)


def exact_neighbors(vectors: np.ndarray, queries: np.ndarray, *, use_gpu: bool = False) -> np.ndarray:
    """The true top 10 of each query, by brute force."""
    import faiss

    if use_gpu:
        exact = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), vectors.shape[1])
    else:
        exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, ids = exact.search(queries, RECALL_K)
    return ids


def neighbors_recall(index: Any, queries: np.ndarray, truth: np.ndarray) -> float:
    """recall@10: the share of the true 10 nearest neighbours that the index returns in its top 10."""
    _, found = index.search(queries, RECALL_K)
    hits = sum(
        len((set(row_found.tolist()) & set(row_truth.tolist())) - {-1})
        for row_found, row_truth in zip(found, truth, strict=False)
    )
    possible = int((truth >= 0).sum())  # fewer than 10 when the corpus itself is that small
    return round(hits / possible, 4) if possible else 1.0


def _add(index: Any, vectors: np.ndarray, on_added: Callable[[int], None] | None) -> None:
    for start in range(0, len(vectors), ADD_BATCH):
        index.add(vectors[start : start + ADD_BATCH])
        if on_added:
            on_added(min(start + ADD_BATCH, len(vectors)))


def _train_and_fill(
    index: Any, vectors: np.ndarray, sample: np.ndarray, on_added: Callable[[int], None] | None, *, use_gpu: bool
) -> Any:
    import faiss

    if use_gpu:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.train(vectors[sample])
        _add(gpu_index, vectors, on_added)
        return faiss.index_gpu_to_cpu(gpu_index)
    index.train(vectors[sample])
    _add(index, vectors, on_added)
    return index
