"""Retrieval with the real MiniLM weights and real faiss: the embedder, loading and searching an index."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense

from spotrag_runtime.index import SAMPLE_CORPUS_DIR, Chunker, build_index, load_documents, load_sample_questions
from spotrag_runtime.retrieval import (
    CURRENT_FILE,
    DEFAULT_MODEL,
    MANIFEST_FILE,
    PASSAGES_FILE,
    Embedder,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    LoadedIndex,
    Manifest,
    current_version,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def embedder():
    return Embedder(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory, embedder) -> Path:
    root = tmp_path_factory.mktemp("sample-index")
    build_index([SAMPLE_CORPUS_DIR], root, embedder=embedder)
    return root


@pytest.fixture(scope="module")
def sample_index(sample_root) -> LoadedIndex:
    return LoadedIndex.load(sample_root)


@pytest.fixture(scope="module")
def projected_model_dir(tmp_path_factory) -> str:
    """A real sentence-transformers model of another dimension: MiniLM followed by a 384→128 projection."""
    torch.manual_seed(0)
    base = SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu")
    model = SentenceTransformer(modules=[base[0], base[1], Dense(in_features=384, out_features=128)], device="cpu")
    path = tmp_path_factory.mktemp("minilm-128d")
    model.save(str(path))
    return str(path)


def test_bundled_minilm_is_found_under_both_names():
    path = resolve_model_path("all-MiniLM-L6-v2")
    assert path == resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(path) / "model.safetensors").is_file()
    assert resolve_model_path("intfloat/multilingual-e5-large") == "intfloat/multilingual-e5-large"


def test_embedder_describes_the_model_and_returns_unit_vectors(embedder):
    assert (embedder.model_name, embedder.dimension, embedder.max_seq_length) == (DEFAULT_MODEL, 384, 256)
    vectors = embedder.embed_queries(["When does the night ferry leave?", "夜行便は何時に出ますか？"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_passages([]).shape == (0, 384)
    assert embedder.count_tokens("The ferry leaves.") == 4  # the, ferry, leaves, .


def test_prefixes_are_prepended(embedder):
    prefixed = Embedder(DEFAULT_MODEL, device="cpu", query_prefix="query: ", passage_prefix="passage: ")
    text = "Pets travel on the outer deck."
    np.testing.assert_allclose(prefixed.embed_queries([text]), embedder.embed_queries(["query: " + text]), atol=1e-6)
    np.testing.assert_allclose(
        prefixed.embed_passages([text]), embedder.embed_passages(["passage: " + text]), atol=1e-6
    )


@pytest.mark.parametrize("passage_prefix", ["", "passage: "])
def test_embedding_token_ids_matches_embedding_text(embedder, passage_prefix):
    # The builder embeds the chunker's token ids instead of re-tokenizing text: same vectors.
    model = embedder if not passage_prefix else Embedder(DEFAULT_MODEL, device="cpu", passage_prefix=passage_prefix)
    chunks = list(
        Chunker(model.tokenizer).chunk_documents(
            load_documents([SAMPLE_CORPUS_DIR / "ja", SAMPLE_CORPUS_DIR / "handbook" / "fleet.md"])
        )
    )
    from_ids = model.embed_token_ids([chunk.token_ids for chunk in chunks])
    from_text = model.embed_passages([chunk.text for chunk in chunks])
    np.testing.assert_allclose(from_ids, from_text, atol=1e-5)


def test_sample_questions_find_their_passage_in_the_top_three(embedder, sample_index):
    questions = load_sample_questions()
    assert {question.language for question in questions} == {"en", "ja"}
    results = sample_index.search(embedder.embed_queries([q.question for q in questions]), 3)
    misses = [
        (question.question, [(hit.passage.source, round(hit.score, 3)) for hit in hits])
        for question, hits in zip(questions, results, strict=False)
        if not any(hit.passage.source == question.source and question.answer in hit.passage.text for hit in hits)
    ]
    assert misses == []


def test_hits_are_ordered_and_thresholded(embedder, sample_index):
    query = embedder.embed_queries(["Can I bring my dog on the ferry?"])
    [hits] = sample_index.search(query, 10)
    scores = [hit.score for hit in hits]
    assert len(hits) == 10 and scores == sorted(scores, reverse=True)
    assert hits[0].passage.source == "handbook/pets-onboard.md"
    [kept] = sample_index.search(query, 10, score_threshold=0.3)
    assert 0 < len(kept) < 10 and all(hit.score >= 0.3 for hit in kept)
    [everything] = sample_index.search(query[0], 1000)  # a single vector; k above the size
    assert len(everything) == sample_index.size


def test_search_refuses_bad_queries(sample_index):
    with pytest.raises(IndexMismatchError, match="dimension 384"):
        sample_index.search(np.zeros((1, 128), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="top_k"):
        sample_index.search(np.zeros((1, 384), dtype=np.float32), 0)


def test_compatible_embedder_is_accepted(embedder, sample_index):
    sample_index.check_compatible(embedder)


def test_other_prefixes_are_refused_naming_them(sample_index):
    e5_style = Embedder("all-MiniLM-L6-v2", device="cpu", query_prefix="query: ", passage_prefix="passage: ")
    with pytest.raises(
        IndexMismatchError, match=r"query_prefix 'query: ' \(index: ''\); passage_prefix 'passage: ' \(index: ''\)"
    ):
        sample_index.check_compatible(e5_style)


def test_other_dimension_is_refused_naming_model_and_dimension(sample_index, projected_model_dir):
    projected = Embedder(projected_model_dir, device="cpu")
    assert projected.dimension == 128
    with pytest.raises(IndexMismatchError, match=r"model .*minilm-128d.*dimension 128 \(index: 384\)"):
        sample_index.check_compatible(projected)


def test_published_layout_and_current_version(sample_root, sample_index):
    assert current_version(sample_root) == sample_index.version
    assert (sample_root / CURRENT_FILE).read_text().strip() == sample_index.version
    manifest = json.loads((sample_index.path / MANIFEST_FILE).read_text())
    assert manifest["count"] == sample_index.size and manifest["model"] == DEFAULT_MODEL
    # A version folder can be loaded directly, e.g. one copied out of object storage.
    assert LoadedIndex.load(sample_index.path).version == sample_index.version


def test_missing_index_is_named(tmp_path):
    assert current_version(tmp_path) is None
    with pytest.raises(IndexNotFoundError, match="no index at"):
        LoadedIndex.load(tmp_path)
    (tmp_path / CURRENT_FILE).write_text("20990101T000000Z-gone\n")
    with pytest.raises(IndexNotFoundError, match="names version '20990101T000000Z-gone'"):
        LoadedIndex.load(tmp_path)


def test_truncated_copy_is_refused(sample_index, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sample_index.path, copy)
    passages = (copy / PASSAGES_FILE).read_bytes()
    (copy / PASSAGES_FILE).write_bytes(passages[: len(passages) // 2].rsplit(b"\n", 1)[0] + b"\n")
    with pytest.raises(IndexCorruptError, match="checksum"):
        LoadedIndex.load(copy)
    with pytest.raises(IndexCorruptError, match=r"\d+ vectors, \d+ passages"):
        LoadedIndex.load(copy, verify=False)


def test_manifest_from_a_newer_format_is_refused_and_unknown_keys_ignored(sample_index):
    data = sample_index.manifest.to_dict()
    assert Manifest.from_dict({**data, "added_later": 1}, where="m") == sample_index.manifest
    with pytest.raises(IndexCorruptError, match="format 99"):
        Manifest.from_dict({**data, "format": 99}, where="m")
    without_model = {key: value for key, value in data.items() if key != "model"}
    with pytest.raises(IndexCorruptError, match="lacks model"):
        Manifest.from_dict(without_model, where="m")
