"""The on-disk index a gateway loads: a manifest, a faiss index and a passage store.

Layout (written by `spotrag_runtime.index`, read here)::

    ROOT/CURRENT                      the name of the live version (replaced atomically)
    ROOT/versions/<version>/
        manifest.json                 what built it: model, dimension, prefixes, counts, checksum
        index.faiss                   vectors; row i is passage id i
        passages.jsonl                one passage per line, in id order

Errors::

    IndexStoreError
    ├── IndexNotFoundError    no index at the path, or CURRENT names a missing version
    ├── IndexCorruptError     unreadable manifest, checksum or count that does not match
    └── IndexMismatchError    built with another model, dimension or prefixes
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .embedder import canonical_model_name

if TYPE_CHECKING:
    from .embedder import Embedder

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
# Bumped when the layout or the manifest changes in a way an older reader cannot load.
FORMAT_VERSION = 1


class IndexStoreError(Exception):
    """Base of the errors raised when loading or using an index."""


class IndexNotFoundError(IndexStoreError):
    pass


class IndexCorruptError(IndexStoreError):
    pass


class IndexMismatchError(IndexStoreError):
    pass


@dataclass(frozen=True)
class Passage:
    id: int
    text: str
    source: str
    position: int  # order of the passage within its source, from 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # cosine similarity: inner product of normalized vectors


@dataclass(frozen=True)
class Manifest:
    model: str
    dimension: int
    query_prefix: str
    passage_prefix: str
    count: int
    index_type: str  # flat | hnsw | ivf
    metric: str  # inner_product
    normalized: bool
    checksum: str  # sha256 over index.faiss then passages.jsonl
    version: str
    created_at: str  # RFC 3339, UTC
    recall_at_10: float | None  # approximate vs exact search (see recall_queries); None for exact (flat)
    chunking: dict[str, Any]
    search_params: dict[str, Any] = field(default_factory=dict)  # faiss ParameterSpace names: nprobe, efSearch
    source_fingerprint: str = ""  # hash of the model, passage prefix, chunking and every chunk's tokens
    recall_queries: str = ""  # what recall_at_10 was measured on
    format: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> Manifest:
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise IndexCorruptError(f"manifest {where} lacks {', '.join(missing)}")
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise IndexCorruptError(
                f"manifest {where} has format {data['format']}; this spotrag reads format {FORMAT_VERSION} or older"
            )
        # Unknown keys are ignored so that a newer builder's additions do not break older gateways.
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_version(root: str | Path) -> str | None:
    """The live version under `root`, or None when nothing was published yet. Cheap enough to poll."""
    try:
        name = (Path(root) / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def version_dir(root: str | Path, version: str) -> Path:
    return Path(root) / VERSIONS_DIR / version


def file_checksum(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def resolve_version_dir(root: str | Path) -> Path:
    """root/CURRENT → root/versions/<v>/; a folder holding manifest.json is taken as a version itself."""
    root = Path(root)
    if (root / MANIFEST_FILE).is_file():
        return root
    version = current_version(root)
    if version is None:
        raise IndexNotFoundError(f"no index at {root}: neither {root / CURRENT_FILE} nor {root / MANIFEST_FILE} exists")
    path = version_dir(root, version)
    if not (path / MANIFEST_FILE).is_file():
        raise IndexNotFoundError(
            f"{root / CURRENT_FILE} names version {version!r}, but {path / MANIFEST_FILE} does not exist"
        )
    return path


def read_manifest(path: Path) -> Manifest:
    where = str(path / MANIFEST_FILE)
    try:
        data = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"cannot read manifest {where}: {exc}") from exc
    if not isinstance(data, dict):
        raise IndexCorruptError(f"manifest {where} is not a JSON object")
    return Manifest.from_dict(data, where=where)


class LoadedIndex:
    """One published index version, loaded into memory and ready to search."""

    def __init__(self, path: Path, manifest: Manifest, index: Any, passages: list[Passage]) -> None:
        self.path = path
        self.manifest = manifest
        self.version = manifest.version
        self.size = len(passages)
        self.passages = passages
        self._index = index

    def __repr__(self) -> str:
        return f"LoadedIndex({str(self.path)!r}, version={self.version!r}, size={self.size}, type={self.manifest.index_type!r})"

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (row i is passage i), for tools and benchmarks."""
        return self._index

    @classmethod
    def load(cls, root: str | Path, *, verify: bool = True) -> LoadedIndex:
        """Load the live version under `root` (or `root` itself when it is a version folder).

        `verify` checks the checksum of the files against the manifest, so a gateway
        never serves a truncated copy (a torn object-store download, a full disk).
        """
        import faiss

        path = resolve_version_dir(root)
        manifest = read_manifest(path)
        index_path, passages_path = path / INDEX_FILE, path / PASSAGES_FILE
        for required in (index_path, passages_path):
            if not required.is_file():
                raise IndexNotFoundError(f"index version {path} lacks {required.name}")
        if verify:
            actual = file_checksum([index_path, passages_path])
            if actual != manifest.checksum:
                raise IndexCorruptError(
                    f"index version {path}: checksum {actual} does not match the manifest's {manifest.checksum}"
                )
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read {index_path}: {exc}") from exc
        passages = _read_passages(passages_path)
        if index.ntotal != len(passages) or index.ntotal != manifest.count:
            raise IndexCorruptError(
                f"index version {path}: {index.ntotal} vectors, {len(passages)} passages, manifest says {manifest.count}"
            )
        if index.d != manifest.dimension:
            raise IndexCorruptError(
                f"index version {path}: vectors have dimension {index.d}, manifest says {manifest.dimension}"
            )
        parameters = faiss.ParameterSpace()
        for name, value in manifest.search_params.items():
            parameters.set_index_parameter(index, name, value)
        return cls(path, manifest, index, passages)

    def check_compatible(self, embedder: Embedder) -> None:
        """Refuse an embedder whose vectors would not be comparable with the index's."""
        expected = {
            "model": self.manifest.model,
            "dimension": self.manifest.dimension,
            "query_prefix": self.manifest.query_prefix,
            "passage_prefix": self.manifest.passage_prefix,
        }
        actual = {
            "model": canonical_model_name(embedder.model_name),
            "dimension": embedder.dimension,
            "query_prefix": embedder.query_prefix,
            "passage_prefix": embedder.passage_prefix,
        }
        differences = [
            f"{key} {actual[key]!r} (index: {expected[key]!r})" for key in expected if expected[key] != actual[key]
        ]
        if differences:
            raise IndexMismatchError(
                f"index {self.path} (version {self.version}) was built differently from this embedder: "
                + "; ".join(differences)
            )

    def search(self, query_vectors: np.ndarray, top_k: int, *, score_threshold: float | None = None) -> list[list[Hit]]:
        """Top-k passages for each query vector, best first; hits under `score_threshold` are dropped."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[np.newaxis, :]
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dimension:
            raise IndexMismatchError(
                f"query vectors have shape {query_vectors.shape}; index {self.version} holds vectors of dimension {self.manifest.dimension}"
            )
        if len(queries) == 0:
            return []
        scores, ids = self._index.search(queries, min(top_k, self.size))
        results: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=False):
            hits = []
            for score, passage_id in zip(row_scores.tolist(), row_ids.tolist(), strict=False):
                # faiss pads with -1 when an approximate index finds fewer than k.
                if passage_id < 0 or (score_threshold is not None and score < score_threshold):
                    continue
                hits.append(Hit(self.passages[passage_id], float(score)))
            results.append(hits)
        return results


def _read_passages(path: Path) -> list[Passage]:
    passages = []
    with path.open(encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            try:
                passage = Passage(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise IndexCorruptError(f"{path}:{line_number}: not a passage: {exc}") from exc
            if passage.id != len(passages):
                raise IndexCorruptError(f"{path}:{line_number}: passage id {passage.id}, expected {len(passages)}")
            passages.append(passage)
    return passages
