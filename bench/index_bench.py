"""Index builder benchmark: passages/s for chunk + embed + index with the share of each stage,
query latency and recall@10 per faiss index type at 100k vectors, and (on a GPU) how close
embedding gets to the model's own forward-only throughput.

    python bench/index_bench.py --device cpu                      # docs/benchmarks.md, CPU rows
    python bench/index_bench.py --device cuda --full-builds 10000,100000   # GPU rows

The corpus is synthetic: documents recombined from the bundled handbook's sentences,
written as JSONL and read back by the real loader. On CPU the embedding of 10k and
100k passages would take hours on two cores, so the whole pipeline runs on a sample
(`--sample-passages`) and the embed time at 10k/100k is extrapolated from its rate;
load, chunk and index are measured at full size. The index-type comparison uses synthetic
vectors scattered around the sample's real embeddings, queried with synthetic questions
(`synthetic_queries`, the same generator the builder tunes on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import torch

from spotrag_runtime.index import SAMPLE_CORPUS_DIR, Chunker, build_index, load_documents, load_sample_questions
from spotrag_runtime.index.vector_index import build_vector_index, choose_index_type, gpu_available, synthetic_queries
from spotrag_runtime.retrieval import DEFAULT_MODEL, Embedder, LoadedIndex, set_torch_threads

SEED = 20240611
LATENCY_QUERIES = 300


def synthetic_corpus(folder: Path, passages: int, tokenizer, rng: np.random.Generator) -> Path:
    """Documents made of the handbook's English sentences, about `passages` chunks in all."""
    sentences = []
    for document in load_documents([SAMPLE_CORPUS_DIR / "handbook"]):
        for paragraph in document.text.split("\n\n"):
            sentences += [
                s
                for s in re.split(r"(?<=[.!?])\s+", paragraph.replace("\n", " "))
                if len(s) > 30 and not s.startswith("#")
            ]

    def document(number: int) -> dict:
        picked = rng.choice(len(sentences), size=16)  # 4 paragraphs of 4 sentences
        return {
            "source": f"synthetic/{number}",
            "text": "\n\n".join(" ".join(sentences[i] for i in picked[p : p + 4]) for p in range(0, 16, 4)),
        }

    # Calibrate documents per passage on a small batch, chunked for real, then write that many.
    probe = [document(n) for n in range(100)]
    per_document = sum(len(Chunker(tokenizer).chunk_text(d["text"])) for d in probe) / len(probe)
    path = folder / f"corpus-{passages}.jsonl"
    with path.open("w", encoding="utf-8") as stream:
        for number in range(max(1, round(passages / per_document))):
            stream.write(json.dumps(document(number)) + "\n")
    return path


def time_load_and_chunk(corpus: Path, tokenizer) -> tuple[int, float, float, list]:
    started = time.perf_counter()
    documents = load_documents([corpus])
    loaded = time.perf_counter()
    chunks = list(Chunker(tokenizer).chunk_documents(documents))
    return len(chunks), loaded - started, time.perf_counter() - loaded, chunks


def scattered_vectors(anchors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic unit vectors around real embeddings (cosine ~0.8 to their anchor): topic-like clusters."""
    picked = anchors[rng.integers(0, len(anchors), size=count)]
    noise = rng.normal(size=picked.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = 0.8 * picked + 0.6 * noise
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def compare_index_types(vectors: np.ndarray, queries: np.ndarray) -> list[dict]:
    """Build each type, then time single-query searches (one thread, as a gateway request) and measure recall@10."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    rows = []
    for index_type in ("flat", "hnsw", "ivf"):
        started = time.perf_counter()
        built = build_vector_index(vectors, index_type, use_gpu=False)
        build_seconds = time.perf_counter() - started
        faiss.omp_set_num_threads(1)
        latencies = []
        found = []
        for query in queries[:LATENCY_QUERIES]:
            started = time.perf_counter()
            _, ids = built.index.search(query[np.newaxis, :], 10)
            latencies.append((time.perf_counter() - started) * 1000)
            found.append(ids[0])
        faiss.omp_set_num_threads(THREADS)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth[:LATENCY_QUERIES], strict=False)])
        rows.append({
            "type": index_type,
            "params": built.search_params,
            "build_s": round(build_seconds, 1),
            "recall@10 (at build)": built.recall_at_10,
            "recall@10 (new queries)": round(float(recall), 3),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        })  # fmt: skip
    return rows


def gpu_embedding_efficiency(embedder: Embedder, chunks: list, batch_size: int) -> dict:
    """passages/s: the model's forward pass alone on batches already on the GPU, embed_token_ids, and plain encode()."""
    sequences = [chunk.token_ids for chunk in chunks]
    full = sorted((embedder.passage_input_ids(ids) for ids in sequences), key=len, reverse=True)
    batches = []
    for start in range(0, len(full), batch_size):
        rows = full[start : start + batch_size]
        width = len(rows[0])
        ids = torch.zeros((len(rows), width), dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for row, values in enumerate(rows):
            ids[row, : len(values)] = torch.tensor(values)
            mask[row, : len(values)] = 1
        batches.append(
            {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "token_type_ids": torch.zeros_like(ids).cuda()}
        )
    model = embedder.model

    def forward_only() -> None:
        with torch.inference_mode():
            for features in batches:
                model(dict(features))["sentence_embedding"]
        torch.cuda.synchronize()

    def best_rate(run) -> float:
        """passages/s of the fastest of three runs: throughput, not the machine's hiccups."""
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
        return len(full) / min(seconds)

    forward_only()  # warm-up: kernels, allocator
    embedder.batch_size = batch_size
    texts = [chunk.text for chunk in chunks]
    results = {
        "forward_only": best_rate(forward_only),
        "embed_token_ids": best_rate(lambda: embedder.embed_token_ids(sequences)),
        "sentence_transformers_encode": best_rate(
            lambda: model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
        ),
    }
    results["embed_share_of_forward_only"] = results["embed_token_ids"] / results["forward_only"]
    return {
        key: round(value, 3) if key.endswith("share_of_forward_only") else round(value, 1)
        for key, value in results.items()
    }


def chunk_size_quality(embedder: Embedder, sizes: list[tuple[int, int]]) -> list[dict]:
    """Top-1/top-3 hits and MRR of the bundled questions for each (chunk tokens, overlap)."""
    questions = load_sample_questions()
    query_vectors = embedder.embed_queries([question.question for question in questions])
    documents = load_documents([SAMPLE_CORPUS_DIR])
    rows = []
    for chunk_tokens, overlap in sizes:
        chunks = list(
            Chunker(embedder.tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap).chunk_documents(documents)
        )
        scores = query_vectors @ embedder.embed_token_ids([chunk.token_ids for chunk in chunks]).T
        ranks = []
        for question, row in zip(questions, scores, strict=False):
            ranked = np.argsort(-row)
            ranks.append(
                next(
                    r
                    for r, i in enumerate(ranked)
                    if chunks[i].source == question.source and question.answer in chunks[i].text
                )
            )
        ranks = np.asarray(ranks)
        rows.append({
            "chunk_tokens": chunk_tokens, "overlap": overlap, "passages": len(chunks),
            "top1": int((ranks == 0).sum()), "top3": int((ranks < 3).sum()), "questions": len(questions),
            "mrr": round(float(np.mean(1 / (ranks + 1))), 3),
        })  # fmt: skip
    return rows


def main(argv: list[str]) -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name or path (e.g. a copy of the weights in fp16)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--sizes", default="10000,100000", help="corpus sizes in passages (load, chunk and index at full size)"
    )
    parser.add_argument("--full-builds", default="", help="sizes to also build end to end with real embeddings (GPU)")
    parser.add_argument(
        "--sample-passages", type=int, default=400, help="passages built end to end to measure the embed rate"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--index-vectors", type=int, default=100_000)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    THREADS = set_torch_threads(args.threads)
    faiss.omp_set_num_threads(THREADS)
    rng = np.random.default_rng(SEED)
    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "threads": THREADS, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "faiss_gpu": gpu_available(), "torch": torch.__version__, "faiss": faiss.__version__,
            "load_average_at_start": os.getloadavg()[0],
        },
    }  # fmt: skip
    print(json.dumps(report["machine"]), flush=True)
    embedder = Embedder(args.model, device=args.device, batch_size=args.batch_size)

    report["chunk_sizes"] = chunk_size_quality(embedder, [(254, 32), (200, 30), (160, 24), (128, 20), (96, 16)])
    print(json.dumps(report["chunk_sizes"]), flush=True)

    with tempfile.TemporaryDirectory(prefix="index-bench-") as scratch:
        scratch = Path(scratch)
        # 1. The whole pipeline on a sample: the embed rate and every stage's share, measured.
        sample_corpus = synthetic_corpus(scratch, args.sample_passages, embedder.tokenizer, rng)
        sample = build_index([sample_corpus], scratch / "sample-index", embedder=embedder, shard_size=1 << 30)
        embed_rate = sample.count / sample.seconds["embed"]
        report["sample_build"] = {
            "passages": sample.count,
            "seconds": sample.seconds,
            "embed_passages_per_s": round(embed_rate, 1),
        }
        print(json.dumps(report["sample_build"]), flush=True)
        anchors = LoadedIndex.load(scratch / "sample-index").faiss_index.reconstruct_n(0, sample.count)

        # 2. Each corpus size: load and chunk measured; embed measured (full build) or extrapolated; index measured.
        full_builds = {int(n) for n in args.full_builds.split(",") if n}
        report["pipeline"] = []
        for size in [int(n) for n in args.sizes.split(",") if n]:
            corpus = synthetic_corpus(scratch, size, embedder.tokenizer, rng)
            if size in full_builds:
                built = build_index([corpus], scratch / f"index-{size}", embedder=embedder, shard_size=8192)
                seconds, count, measured = dict(built.seconds), built.count, "measured"
            else:
                count, load_s, chunk_s, _ = time_load_and_chunk(corpus, embedder.tokenizer)
                started = time.perf_counter()
                build_vector_index(scattered_vectors(anchors, count, rng), choose_index_type(count))
                seconds = {
                    "load": load_s,
                    "chunk": chunk_s,
                    "embed": count / embed_rate,
                    "index": time.perf_counter() - started,
                }
                measured = "embed extrapolated from the sample; index on synthetic vectors"
            total = sum(seconds.values())
            row = {
                "passages": count, "index_type": choose_index_type(count), "how": measured,
                "passages_per_s": round(count / total, 1),
                "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
                "share": {stage: f"{100 * value / total:.1f}%" for stage, value in seconds.items()},
            }  # fmt: skip
            report["pipeline"].append(row)
            print(json.dumps(row), flush=True)

        # 3. Index types at 100k vectors. Synthetic ones: the synthetic corpus repeats ~150
        # sentences, so its real embeddings are near-duplicates whose top 10 is mostly ties.
        vectors, origin = (
            scattered_vectors(anchors, args.index_vectors, rng),
            "synthetic vectors around real embeddings",
        )
        # New questions from the same generator the builder tunes on, other passages, other noise:
        # checks that the recall recorded at build time predicts recall on queries it never saw.
        queries = synthetic_queries(vectors[rng.choice(len(vectors), size=LATENCY_QUERIES, replace=False)], rng)
        report["index_types"] = {
            "vectors": len(vectors),
            "origin": origin,
            "rows": compare_index_types(vectors, queries),
        }
        print(json.dumps(report["index_types"]), flush=True)

        # 4. On a GPU: how much of the model's forward-only throughput embedding reaches.
        if args.device.startswith("cuda"):
            _, _, _, chunks = time_load_and_chunk(
                synthetic_corpus(scratch, 20_000, embedder.tokenizer, rng), embedder.tokenizer
            )
            report["gpu_embedding"] = gpu_embedding_efficiency(embedder, chunks, args.batch_size)
            print(json.dumps(report["gpu_embedding"]), flush=True)

    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
