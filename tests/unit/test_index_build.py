"""The index builder end to end: real model, real faiss, real files, real processes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from spotrag_box.testing import eventually
from spotrag_runtime.index import (
    RESULT_FILE,
    SAMPLE_CORPUS_DIR,
    CorpusError,
    EmptyCorpusError,
    IndexBuildError,
    build_index,
    choose_index_type,
    load_sample_questions,
)
from spotrag_runtime.index.cli import cli
from spotrag_runtime.index.vector_index import RECALL_TARGET, build_vector_index
from spotrag_runtime.retrieval import (
    CURRENT_FILE,
    DEFAULT_MODEL,
    INDEX_FILE,
    MANIFEST_FILE,
    PASSAGES_FILE,
    VERSIONS_DIR,
    Embedder,
    LoadedIndex,
    current_version,
)

SHIPS = "The relief vessel Lantern can replace any ship within three hours.\n\nShe is kept crewed at Port Aubrey."
CAFE = "The Galley Bell café opens fifteen minutes after departure.\n\nIt takes card payments only."


@pytest.fixture(scope="module")
def embedder():
    return Embedder(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory, embedder):
    """The bundled corpus built once, with the stages it reported."""
    stages = []
    root = tmp_path_factory.mktemp("sample-index")
    result = build_index([SAMPLE_CORPUS_DIR], root, embedder=embedder, progress=lambda *event: stages.append(event))
    return root, result, stages


def write_corpus(folder: Path, **documents: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in documents.items():
        (folder / f"{name}.md").write_text(text, encoding="utf-8")
    return folder


def published_state(root: Path) -> tuple[str | None, list[str]]:
    """CURRENT and every entry under versions/, staging folders included."""
    return current_version(root), sorted(path.name for path in (root / VERSIONS_DIR).iterdir())


def test_sample_corpus_build_publishes_a_complete_version(sample_build):
    root, result, stages = sample_build
    assert result.published and result.index_type == "flat" and result.recall_at_10 is None
    assert result.documents == 36 and result.count >= result.documents
    assert [stage for stage, _, _ in stages if stage != "embed"] == ["load", "chunk", "index", "write"]
    assert ("embed", result.count, result.count) in stages
    version_dir = root / VERSIONS_DIR / result.version
    assert sorted(path.name for path in version_dir.iterdir()) == sorted(
        [INDEX_FILE, MANIFEST_FILE, PASSAGES_FILE, RESULT_FILE]
    )
    assert (root / CURRENT_FILE).read_text() == f"{result.version}\n"
    assert json.loads((version_dir / RESULT_FILE).read_text())["version"] == result.version
    assert not any((root / ".work").iterdir())  # checkpoints are removed once published
    loaded = LoadedIndex.load(root)
    assert loaded.size == result.count and loaded.manifest == result.manifest
    fleet = [passage for passage in loaded.passages if passage.source == "handbook/fleet.md"]
    assert [passage.position for passage in fleet] == list(range(len(fleet))) and len(fleet) > 1


def test_unchanged_corpus_is_not_published_again_unless_forced(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs", ships=SHIPS)
    first = build_index([corpus], tmp_path / "index", embedder=embedder)
    again = build_index([corpus], tmp_path / "index", embedder=embedder)
    assert not again.published and again.version == first.version
    forced = build_index([corpus], tmp_path / "index", embedder=embedder, force=True)
    assert forced.published and forced.version != first.version
    assert current_version(tmp_path / "index") == forced.version


def test_new_version_swaps_in_atomically_and_old_versions_are_pruned(tmp_path, embedder):
    root = tmp_path / "index"
    first = build_index([write_corpus(tmp_path / "a", ships=SHIPS)], root, embedder=embedder, keep_versions=2)
    serving = LoadedIndex.load(root)
    second = build_index([write_corpus(tmp_path / "b", cafe=CAFE)], root, embedder=embedder, keep_versions=2)
    assert current_version(root) == second.version
    assert published_state(root)[1] == sorted([first.version, second.version])
    # A gateway still serving the first version keeps answering from it until it swaps.
    [hits] = serving.search(embedder.embed_queries(["Which ship is the relief vessel?"]), 1)
    assert hits[0].passage.source == "ships.md" and serving.version == first.version
    assert LoadedIndex.load(root).passages[0].source == "cafe.md"
    third = build_index(
        [write_corpus(tmp_path / "c", ships=SHIPS, cafe=CAFE)], root, embedder=embedder, keep_versions=2
    )
    assert published_state(root) == (third.version, sorted([second.version, third.version]))


@pytest.mark.parametrize(("index_type", "real_questions"), [("hnsw", True), ("ivf", False)])
def test_approximate_index_is_tuned_and_searchable(tmp_path, embedder, index_type, real_questions):
    questions = [question.question for question in load_sample_questions()] if real_questions else None
    result = build_index(
        [SAMPLE_CORPUS_DIR], tmp_path, embedder=embedder, index_type=index_type, eval_queries=questions
    )
    assert result.index_type == index_type and result.recall_at_10 is not None and result.recall_at_10 >= RECALL_TARGET
    assert set(result.manifest.search_params) == {"efSearch" if index_type == "hnsw" else "nprobe"}
    expected_queries = "33 given questions" if real_questions else f"{result.count} synthetic questions at cosine 0.6"
    assert result.manifest.recall_queries.startswith(expected_queries)
    loaded = LoadedIndex.load(tmp_path)
    question = load_sample_questions()[0]
    [hits] = loaded.search(embedder.embed_queries([question.question]), 3)
    assert question.source in [hit.passage.source for hit in hits]


@pytest.mark.parametrize(("index_type", "param"), [("hnsw", "efSearch"), ("ivf", "nprobe")])
def test_tuning_reaches_the_recall_target_on_clustered_vectors(index_type, param):
    # Index-only check on synthetic data: 6,000 vectors around 60 centres, like topics in a corpus.
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(60, 64))
    vectors = centres[rng.integers(0, 60, size=6000)] + 0.6 * rng.normal(size=(6000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    built = build_vector_index(vectors, index_type, use_gpu=False)
    assert built.recall_at_10 >= RECALL_TARGET and param in built.search_params
    assert built.index.ntotal == 6000


def test_index_type_follows_corpus_size():
    assert [choose_index_type(n) for n in (40, 49_999, 50_000, 1_999_999, 2_000_000)] == [
        "flat",
        "flat",
        "hnsw",
        "hnsw",
        "ivf",
    ]
    assert choose_index_type(10, "ivf") == "ivf"
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        choose_index_type(10, "annoy")


def test_build_killed_midway_resumes_from_its_checkpoints(tmp_path, sample_build, capsys):
    root, work = tmp_path / "index", tmp_path / "work"
    command = [
        sys.executable, "-m", "spotrag_runtime.index", "build", str(SAMPLE_CORPUS_DIR), "--out", str(root),
        "--work-dir", str(work), "--shard-size", "2", "--device", "cpu", "--threads", "1", "--progress", "json",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:

        def checkpoints_written() -> bool:
            assert process.poll() is None, process.stderr.read().decode()
            return len(list(work.glob("*/shard-*.npy"))) >= 3

        eventually(checkpoints_written, what="the build to write checkpoints", timeout=120)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert current_version(root) is None  # nothing half-built was published
    checkpoints = len(list(work.glob("*/shard-*.npy")))

    exit_code = cli(
        [
            "build",
            str(SAMPLE_CORPUS_DIR),
            "--out",
            str(root),
            "--work-dir",
            str(work),
            "--shard-size",
            "2",
            "--device",
            "cpu",
            "--progress",
            "json",
        ]
    )
    assert exit_code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["resumed_shards"] >= checkpoints >= 3
    assert result["resumed_shards"] + result["embedded_shards"] == -(-result["count"] // 2)
    # The resumed index holds the same vectors as an uninterrupted build.
    _, uninterrupted, _ = sample_build
    resumed_vectors = faiss.read_index(str(root / VERSIONS_DIR / result["version"] / INDEX_FILE)).reconstruct_n(
        0, result["count"]
    )
    reference_vectors = faiss.read_index(str(uninterrupted.path / INDEX_FILE)).reconstruct_n(0, uninterrupted.count)
    np.testing.assert_allclose(resumed_vectors, reference_vectors, atol=1e-5)


def test_bad_corpus_fails_naming_it_and_keeps_the_published_index(tmp_path, embedder):
    root = tmp_path / "index"
    good = build_index([write_corpus(tmp_path / "good", ships=SHIPS)], root, embedder=embedder)
    before = published_state(root)
    empty = write_corpus(tmp_path / "empty", blank="\n\n")
    with pytest.raises(EmptyCorpusError, match="no text to index in .*empty"):
        build_index([empty], root, embedder=embedder)
    broken = write_corpus(tmp_path / "broken", ships=SHIPS)
    (broken / "legacy.txt").write_bytes(b"Fjord \xf8 crossing")
    with pytest.raises(CorpusError, match=r"legacy\.txt is not UTF-8"):
        build_index([broken], root, embedder=embedder)
    assert published_state(root) == before
    assert LoadedIndex.load(root).version == good.version


def test_chunks_longer_than_the_model_reads_are_refused(tmp_path, embedder):
    with pytest.raises(ValueError, match=r"chunks of 300 tokens do not fit .* at most 254"):
        build_index(
            [write_corpus(tmp_path / "docs", ships=SHIPS)], tmp_path / "index", embedder=embedder, chunk_tokens=300
        )


def test_settings_that_contradict_the_given_embedder_are_refused(tmp_path, embedder):
    with pytest.raises(ValueError, match="passage prefix 'passage: '"):
        build_index(
            [write_corpus(tmp_path / "docs", ships=SHIPS)],
            tmp_path / "index",
            embedder=embedder,
            passage_prefix="passage: ",
        )


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so writes fail with a real ENOSPC."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler


@pytest.mark.parametrize("checkpoints_on_the_full_disk", [True, False])
def test_full_disk_fails_naming_the_file_and_keeps_the_published_index(
    tmp_path, embedder, small_disk, checkpoints_on_the_full_disk
):
    root = small_disk / "index"
    work_dir = None if checkpoints_on_the_full_disk else tmp_path / "work"
    good = build_index([write_corpus(tmp_path / "a", ships=SHIPS)], root, embedder=embedder, work_dir=work_dir)
    before = published_state(root)
    filler = fill(small_disk, leave_bytes=4096)
    bigger = write_corpus(tmp_path / "b", **{f"part{n}": f"{CAFE} Sailing {n} is listed." for n in range(20)})
    with pytest.raises(
        IndexBuildError,
        match=r"cannot write .*(shard-|\.staging-).*: no space left on device; the published index is unchanged",
    ):
        build_index([bigger], root, embedder=embedder, work_dir=work_dir)
    assert published_state(root) == before  # no staging folder left behind either
    assert LoadedIndex.load(root).version == good.version
    filler.unlink()
    assert build_index([bigger], root, embedder=embedder, work_dir=work_dir).published  # and it recovers


def test_cli_reports_failure_as_json_and_in_the_result_file(tmp_path, capsys):
    result_file = tmp_path / "termination-log"
    exit_code = cli(
        ["build", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "index"), "--result-file", str(result_file)]
    )
    assert exit_code == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip())
    assert report == json.loads(result_file.read_text())
    assert (
        report["ok"] is False
        and report["error_type"] == "CorpusError"
        and "nothing-here does not exist" in report["error"]
    )
    assert "nothing-here does not exist" in captured.err


def test_cli_query_and_info_show_the_published_index(sample_build, capsys):
    root, result, _ = sample_build
    assert cli(["query", str(root), "How long are lost items kept?", "--top-k", "2", "--device", "cpu", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["version"] == result.version and len(answer["hits"]) == 2
    assert answer["hits"][0]["source"] == "handbook/lost-and-found.md" and answer["hits"][0]["rank"] == 1
    assert cli(["query", str(root), "How long are lost items kept?", "--device", "cpu"]) == 0
    assert "1. " in capsys.readouterr().out
    assert cli(["info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["current"] == result.version and info["manifest"]["count"] == result.count
    assert cli(["info", str(root / "absent")]) == 1
    assert "no index at" in capsys.readouterr().err
