"""corpus → chunks → embeddings → faiss index, published atomically as a new version.

A build never changes what readers see until it is complete: the version is
written into a staging folder under ROOT/versions, fsynced, renamed into place,
and only then is ROOT/CURRENT replaced (write a temporary file, os.replace).
Embeddings are checkpointed in shards under a work folder keyed by the corpus
fingerprint, so a build killed at 80% embeds only the last 20% when run again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..retrieval import (
    CURRENT_FILE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    INDEX_FILE,
    MANIFEST_FILE,
    PASSAGES_FILE,
    VERSIONS_DIR,
    Embedder,
    IndexStoreError,
    Manifest,
    Passage,
    canonical_model_name,
)
from ..retrieval.store import file_checksum, read_manifest, resolve_version_dir
from .chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS, Chunk, Chunker
from .loading import DEFAULT_SOURCE_FIELD, DEFAULT_TEXT_FIELD, load_documents
from .vector_index import RECALL_QUERIES, SYNTHETIC_QUERY_COSINE, build_vector_index, choose_index_type

DEFAULT_SHARD_SIZE = 2048
DEFAULT_KEEP_VERSIONS = 3
RESULT_FILE = "result.json"
WORK_DIR = ".work"
LOCK_FILE = ".build.lock"
STAGING_PREFIX = ".staging-"

# (stage, done, total): stages are load, chunk, embed, index, write.
ProgressCallback = Callable[[str, int, int], None]


class IndexBuildError(Exception):
    """A build failed; the previously published version is untouched."""


@dataclass(frozen=True)
class BuildResult:
    version: str
    path: Path  # the version folder
    count: int  # passages
    documents: int
    index_type: str
    recall_at_10: float | None
    published: bool  # False when CURRENT already held an index of the same inputs
    resumed_shards: int  # embedding shards reused from an interrupted build
    embedded_shards: int  # embedding shards computed by this build
    seconds: dict[str, float]  # wall time per stage
    manifest: Manifest

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def build_index(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    model: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    embedder: Embedder | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    index_type: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    work_dir: str | Path | None = None,
    device: str | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    source_field: str = DEFAULT_SOURCE_FIELD,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    force: bool = False,
    eval_queries: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> BuildResult:
    """Build an index of `sources` and publish it as the new version under `out`.

    Pass an already loaded `embedder` to reuse it (tests, the demo); otherwise one is
    loaded from `model` and the prefixes. Unless `force`, a corpus whose fingerprint
    matches the published version is not indexed again (`published` is False).
    `eval_queries` are questions to measure an approximate index's recall@10 on
    (real ones are best); without them synthetic ones are made from the passages.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    if index_type != "auto":
        choose_index_type(0, index_type)  # rejects an unknown name before the model loads
    report = progress or (lambda stage, done, total: None)
    seconds: dict[str, float] = {}
    out = Path(out)

    stage_started = time.perf_counter()
    documents = load_documents(sources, text_field=text_field, source_field=source_field)
    report("load", len(documents), len(documents))
    seconds["load"] = time.perf_counter() - stage_started

    if embedder is None:
        embedder = Embedder(
            model or DEFAULT_MODEL,
            query_prefix=query_prefix or "",
            passage_prefix=passage_prefix or "",
            device=device,
            batch_size=batch_size,
        )
    else:
        _check_embedder_matches(embedder, model=model, query_prefix=query_prefix, passage_prefix=passage_prefix)
    _check_chunk_fits(embedder, chunk_tokens)

    stage_started = time.perf_counter()
    chunker = Chunker(embedder.tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    chunks = list(chunker.chunk_documents(documents))
    report("chunk", len(chunks), len(chunks))
    seconds["chunk"] = time.perf_counter() - stage_started
    chosen_type = choose_index_type(len(chunks), index_type)
    fingerprint = corpus_fingerprint(chunks, embedder, chunker)

    with _output_lock(out):
        _remove_stale_staging(out)
        if not force:
            unchanged = _published_with(out, fingerprint, chosen_type, embedder)
            if unchanged is not None:
                return BuildResult(
                    unchanged.version, out / VERSIONS_DIR / unchanged.version, unchanged.count, len(documents),
                    unchanged.index_type, unchanged.recall_at_10, False, 0, 0, _rounded(seconds), unchanged,
                )  # fmt: skip

        stage_started = time.perf_counter()
        shards = Path(work_dir) if work_dir is not None else out / WORK_DIR
        shards = shards / fingerprint.removeprefix("sha256:")[:16]
        vectors, resumed, embedded = _embed_with_checkpoints(chunks, embedder, shards, shard_size, report)
        seconds["embed"] = time.perf_counter() - stage_started

        stage_started = time.perf_counter()
        query_vectors = embedder.embed_queries(list(eval_queries)) if eval_queries and chosen_type != "flat" else None
        built = build_vector_index(
            vectors, chosen_type, queries=query_vectors, on_added=lambda done: report("index", done, len(chunks))
        )
        if chosen_type == "flat":
            recall_queries = ""
        elif query_vectors is not None:
            recall_queries = f"{len(query_vectors)} given questions"
        else:
            recall_queries = f"{min(RECALL_QUERIES, len(chunks))} synthetic questions at cosine {SYNTHETIC_QUERY_COSINE} from held-out passages"
        seconds["index"] = time.perf_counter() - stage_started

        stage_started = time.perf_counter()
        manifest_fields = {
            "model": embedder.model_name,
            "dimension": embedder.dimension,
            "query_prefix": embedder.query_prefix,
            "passage_prefix": embedder.passage_prefix,
            "count": len(chunks),
            "index_type": built.index_type,
            "metric": "inner_product",
            "normalized": True,
            "recall_at_10": built.recall_at_10,
            "chunking": {**chunker.settings(), "tokenizer": embedder.model_name},
            "search_params": built.search_params,
            "source_fingerprint": fingerprint,
            "recall_queries": recall_queries,
        }
        version_path, manifest = _publish(out, built.index, chunks, manifest_fields)
        seconds["write"] = time.perf_counter() - stage_started
        report("write", 1, 1)
        result = BuildResult(
            manifest.version, version_path, len(chunks), len(documents), built.index_type,
            built.recall_at_10, True, resumed, embedded, _rounded(seconds), manifest,
        )  # fmt: skip
        _write_json(version_path / RESULT_FILE, result.to_dict())
        shutil.rmtree(shards, ignore_errors=True)
        _prune_versions(out, keep_versions)
    return result


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {stage: round(value, 3) for stage, value in seconds.items()}


def corpus_fingerprint(chunks: Sequence[Chunk], embedder: Embedder, chunker: Chunker) -> str:
    """What the embeddings depend on: the model, the passage prefix and every chunk's tokens."""
    digest = hashlib.sha256()
    header = {"model": embedder.model_name, "passage_prefix": embedder.passage_prefix, "chunking": chunker.settings()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for chunk in chunks:
        digest.update(f"\0{chunk.source}\0{chunk.position}\0".encode())
        digest.update(np.asarray(chunk.token_ids, dtype=np.int64).tobytes())
    return f"sha256:{digest.hexdigest()}"


def _check_embedder_matches(
    embedder: Embedder, *, model: str | None, query_prefix: str | None, passage_prefix: str | None
) -> None:
    conflicts = []
    if model is not None and canonical_model_name(model) != embedder.model_name:
        conflicts.append(f"model {model!r} (embedder: {embedder.model_name!r})")
    if query_prefix is not None and query_prefix != embedder.query_prefix:
        conflicts.append(f"query prefix {query_prefix!r} (embedder: {embedder.query_prefix!r})")
    if passage_prefix is not None and passage_prefix != embedder.passage_prefix:
        conflicts.append(f"passage prefix {passage_prefix!r} (embedder: {embedder.passage_prefix!r})")
    if conflicts:
        raise ValueError("build_index was given an embedder and settings that disagree: " + "; ".join(conflicts))


def _check_chunk_fits(embedder: Embedder, chunk_tokens: int) -> None:
    prefix = embedder.count_tokens(embedder.passage_prefix) if embedder.passage_prefix else 0
    room = embedder.max_seq_length - embedder.special_tokens_count - prefix
    if chunk_tokens > room:
        raise ValueError(
            f"chunks of {chunk_tokens} tokens do not fit {embedder.model_name}: it reads {embedder.max_seq_length} tokens, "
            f"{embedder.special_tokens_count} special and {prefix} of passage prefix, so at most {room}; "
            "the rest of each chunk would be cut off and never found"
        )


def _embed_with_checkpoints(
    chunks: Sequence[Chunk], embedder: Embedder, shards: Path, shard_size: int, report: ProgressCallback
) -> tuple[np.ndarray, int, int]:
    vectors = np.empty((len(chunks), embedder.dimension), dtype=np.float32)
    resumed = embedded = 0
    _makedirs(shards)
    report("embed", 0, len(chunks))
    for start in range(0, len(chunks), shard_size):
        end = min(start + shard_size, len(chunks))
        path = shards / f"shard-{start:010d}-{end:010d}.npy"
        saved = _load_shard(path, end - start, embedder.dimension)
        if saved is not None:
            vectors[start:end] = saved
            resumed += 1
        else:
            vectors[start:end] = embedder.embed_token_ids([chunk.token_ids for chunk in chunks[start:end]])
            # Serialized first: numpy's own file writer reports a full disk without an errno.
            serialized = io.BytesIO()
            np.save(serialized, vectors[start:end])
            with _atomic_file(path) as stream:
                stream.write(serialized.getbuffer())
            embedded += 1
        report("embed", end, len(chunks))
    return vectors, resumed, embedded


def _load_shard(path: Path, rows: int, dimension: int) -> np.ndarray | None:
    """A checkpointed shard, or None when it is missing or not what this build expects."""
    try:
        saved = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return saved if saved.shape == (rows, dimension) and saved.dtype == np.float32 else None


def _publish(out: Path, index: Any, chunks: Sequence[Chunk], fields: dict[str, Any]) -> tuple[Path, Manifest]:
    import faiss

    versions = out / VERSIONS_DIR
    _makedirs(versions)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=versions))
    except OSError as exc:
        raise _write_error(exc, versions) from exc
    try:
        # Serialized in memory and written here, so a short write (ENOSPC) raises
        # instead of faiss's fwrite leaving a truncated file behind.
        with _atomic_file(staging / INDEX_FILE) as stream:
            stream.write(faiss.serialize_index(index).tobytes())
        with _atomic_file(staging / PASSAGES_FILE) as stream:
            for passage_id, chunk in enumerate(chunks):
                passage = Passage(passage_id, chunk.text, chunk.source, chunk.position, chunk.metadata)
                stream.write(passage.to_json().encode("utf-8") + b"\n")
        checksum = file_checksum([staging / INDEX_FILE, staging / PASSAGES_FILE])
        now = datetime.now(UTC)
        # Names sort in publishing order (pruning relies on it) and say what they hold.
        stamp = f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z"
        version = _free_version_name(versions, f"{stamp}-{checksum.removeprefix('sha256:')[:8]}")
        manifest = Manifest(
            checksum=checksum, version=version, created_at=now.isoformat(timespec="milliseconds"), **fields
        )
        _write_json(staging / MANIFEST_FILE, manifest.to_dict())
        _fsync_dir(staging)
        final = versions / version
        os.rename(staging, final)
        _fsync_dir(versions)
        with _atomic_file(out / CURRENT_FILE) as stream:
            stream.write(f"{version}\n".encode())
        _fsync_dir(out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(exc, staging) from exc
        raise
    return final, manifest


def _free_version_name(versions: Path, name: str) -> str:
    candidate, attempt = name, 1
    while (versions / candidate).exists():
        attempt += 1
        candidate = f"{name}.{attempt}"
    return candidate


def _published_with(out: Path, fingerprint: str, index_type: str, embedder: Embedder) -> Manifest | None:
    """The published manifest when it was built from the same inputs, else None."""
    try:
        manifest = read_manifest(resolve_version_dir(out))
    except IndexStoreError:
        return None
    same = (
        manifest.source_fingerprint == fingerprint
        and manifest.index_type == index_type
        and manifest.query_prefix == embedder.query_prefix
    )
    return manifest if same else None


def _prune_versions(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` versions; never the current one. Gateways hold loaded indexes in memory."""
    versions = out / VERSIONS_DIR
    current = (out / CURRENT_FILE).read_text(encoding="utf-8").strip()
    names = sorted((p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
    for name in names[keep:]:
        if name != current:
            shutil.rmtree(versions / name, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Staging folders left by a build that was killed; safe to remove while holding the output lock."""
    versions = out / VERSIONS_DIR
    if versions.is_dir():
        for path in versions.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """One build at a time per output folder (two index Jobs racing would interleave versions)."""
    _makedirs(out)
    try:
        handle = open(out / LOCK_FILE, "a")
    except OSError as exc:
        raise _write_error(exc, out / LOCK_FILE) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IndexBuildError(f"another build is writing to {out} (it holds {out / LOCK_FILE})") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """Write to a temporary sibling, fsync, then rename over `path`: readers see old or new, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise _write_error(exc, path) from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with _atomic_file(path) as stream:
        stream.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")


def _makedirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, path) from exc


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_error(exc: OSError, path: Path) -> IndexBuildError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return IndexBuildError(f"cannot write {exc.filename or path}: {reason}; the published index is unchanged")
