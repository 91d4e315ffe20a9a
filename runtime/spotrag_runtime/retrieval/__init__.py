"""Retrieval: embed questions and passages, load a published index and search it.

The gateway imports this package; the index builder (`spotrag_runtime.index`)
writes what `LoadedIndex` reads.
"""

from .embedder import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    Embedder,
    ModelLoadError,
    canonical_model_name,
    resolve_model_path,
    set_torch_threads,
)
from .store import (
    CURRENT_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PASSAGES_FILE,
    VERSIONS_DIR,
    Hit,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    LoadedIndex,
    Manifest,
    Passage,
    current_version,
    resolve_version_dir,
)

__all__ = [
    "CURRENT_FILE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MODEL",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "PASSAGES_FILE",
    "VERSIONS_DIR",
    "Embedder",
    "Hit",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexStoreError",
    "LoadedIndex",
    "Manifest",
    "ModelLoadError",
    "Passage",
    "canonical_model_name",
    "current_version",
    "resolve_model_path",
    "resolve_version_dir",
    "set_torch_threads",
]
