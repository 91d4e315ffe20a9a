"""The index builder: corpus → chunks → embeddings → faiss, published as a version a gateway loads.

`build_index` is the library entry point; `spotrag index build|query|info` the command
(`spotrag_runtime.index.cli:cli`), which is also what the operator's index Job runs.

Errors::

    CorpusError            a source that is missing, unreadable, not UTF-8 or malformed
    └── EmptyCorpusError   no text to index
    IndexBuildError        writing failed (full disk, permissions); the published index is unchanged
"""

from .builder import (
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_SHARD_SIZE,
    RESULT_FILE,
    BuildResult,
    IndexBuildError,
    ProgressCallback,
    build_index,
    corpus_fingerprint,
)
from .chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS, Chunk, Chunker
from .loading import CorpusError, Document, EmptyCorpusError, html_to_text, load_documents
from .sample import SAMPLE_CORPUS_DIR, SAMPLE_QUESTIONS_FILE, SampleQuestion, load_sample_questions
from .vector_index import INDEX_TYPES, choose_index_type

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_KEEP_VERSIONS",
    "DEFAULT_OVERLAP_TOKENS",
    "DEFAULT_SHARD_SIZE",
    "INDEX_TYPES",
    "RESULT_FILE",
    "SAMPLE_CORPUS_DIR",
    "SAMPLE_QUESTIONS_FILE",
    "BuildResult",
    "Chunk",
    "Chunker",
    "CorpusError",
    "Document",
    "EmptyCorpusError",
    "IndexBuildError",
    "ProgressCallback",
    "SampleQuestion",
    "build_index",
    "choose_index_type",
    "corpus_fingerprint",
    "html_to_text",
    "load_documents",
    "load_sample_questions",
]
