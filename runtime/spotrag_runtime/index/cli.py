"""`spotrag index build|query|info`: the index builder as a command, and what the index Job runs.

`build` prints progress on stderr (a bar on a terminal, plain or JSON lines in a log)
and one JSON line on stdout at the end, `{"ok": true, ...}` or `{"ok": false, "error": ...}`;
`--result-file` writes the same object to a file (point it at /dev/termination-log and
Kubernetes hands it to the operator in the pod's status).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, TextIO

from ..retrieval import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    Embedder,
    IndexStoreError,
    LoadedIndex,
    ModelLoadError,
    current_version,
    set_torch_threads,
)
from ..retrieval.store import VERSIONS_DIR
from .builder import DEFAULT_KEEP_VERSIONS, DEFAULT_SHARD_SIZE, IndexBuildError, build_index
from .chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS
from .loading import DEFAULT_SOURCE_FIELD, DEFAULT_TEXT_FIELD, CorpusError, read_questions
from .vector_index import INDEX_TYPES

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRESS_STEPS = 10  # plain and JSON progress: one line per 10% of a stage


def cli(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotrag index", description="Build, query and inspect a spotrag retrieval index."
    )
    commands = parser.add_subparsers(dest="command", metavar="{build,query,info}")

    build = commands.add_parser("build", help="chunk, embed and index a corpus; publish it as a new version")
    build.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="files or folders (.txt .md .html .jsonl)")
    build.add_argument("--out", required=True, type=Path, help="index root: versions/ and CURRENT are written here")
    build.add_argument(
        "--model", default=DEFAULT_MODEL, help="sentence-transformers model name or path (default: %(default)s)"
    )
    build.add_argument("--query-prefix", default="", help='prepended to questions, e.g. "query: " for e5 models')
    build.add_argument("--passage-prefix", default="", help='prepended to passages, e.g. "passage: " for e5 models')
    build.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help="chunk size in model tokens (default: %(default)s)",
    )
    build.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP_TOKENS,
        help="overlap in tokens, whole sentences (default: %(default)s)",
    )
    build.add_argument(
        "--index-type",
        choices=("auto", *INDEX_TYPES),
        default="auto",
        help="auto: flat below 50k passages, then hnsw, ivf from 2M",
    )
    build.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="embedding batch (default: %(default)s; 256-512 on a GPU)",
    )
    build.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="passages per embedding checkpoint (default: %(default)s)",
    )
    build.add_argument(
        "--work-dir", type=Path, help="where checkpoints go (default: OUT/.work); a rerun resumes from them"
    )
    build.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    build.add_argument(
        "--threads", type=int, help="CPU threads for torch and faiss (default: the CPUs this process may use)"
    )
    build.add_argument(
        "--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field holding the text (default: %(default)s)"
    )
    build.add_argument(
        "--source-field", default=DEFAULT_SOURCE_FIELD, help="JSONL field naming the record (default: %(default)s)"
    )
    build.add_argument(
        "--keep-versions",
        type=int,
        default=DEFAULT_KEEP_VERSIONS,
        help="published versions kept (default: %(default)s)",
    )
    build.add_argument("--force", action="store_true", help="publish a new version even when the corpus is unchanged")
    build.add_argument(
        "--eval-queries",
        type=Path,
        help="questions (.jsonl with a 'question' field, or one per line) to tune and report recall@10 on",
    )
    build.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "json", "none"),
        default="auto",
        help="auto: a bar on a terminal, plain lines otherwise",
    )
    build.add_argument(
        "--result-file", type=Path, help="also write the final JSON object here (e.g. /dev/termination-log)"
    )
    build.set_defaults(run=_build)

    query = commands.add_parser("query", help="show what retrieval returns for a question")
    query.add_argument("index", type=Path, metavar="DIR", help="index root or version folder")
    query.add_argument("question")
    query.add_argument("--top-k", type=int, default=5, help="passages to show (default: %(default)s)")
    query.add_argument("--model", help="embedding model (default: the one the index was built with)")
    query.add_argument("--device", help="cpu, cuda … (default: cuda when available)")
    query.add_argument("--threads", type=int, help="CPU threads for torch and faiss")
    query.add_argument("--json", action="store_true", help="print the hits as JSON")
    query.set_defaults(run=_query)

    info = commands.add_parser("info", help="show the published version's manifest and the versions kept")
    info.add_argument("index", type=Path, metavar="DIR", help="index root or version folder")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(run=_info)
    return parser


def _build(args: argparse.Namespace) -> int:
    _quiet_model_loading()
    _set_threads(args.threads)
    reporter = _progress_reporter(args.progress, sys.stderr)
    try:
        with reporter:
            result = build_index(
                args.sources,
                args.out,
                model=args.model,
                query_prefix=args.query_prefix,
                passage_prefix=args.passage_prefix,
                chunk_tokens=args.chunk_tokens,
                overlap_tokens=args.overlap,
                index_type=args.index_type,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                work_dir=args.work_dir,
                device=args.device,
                text_field=args.text_field,
                source_field=args.source_field,
                keep_versions=args.keep_versions,
                force=args.force,
                eval_queries=read_questions(args.eval_queries) if args.eval_queries else None,
                progress=reporter.update,
            )
    except (CorpusError, IndexBuildError, ModelLoadError, ValueError) as exc:
        # ValueError here is a bad option value (chunk size, overlap), checked before any work.
        _emit({"ok": False, "error": str(exc), "error_type": type(exc).__name__}, args.result_file)
        print(f"spotrag index build: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = result.to_dict()
    _emit({"ok": True, **summary}, args.result_file)
    verb = "published" if result.published else "unchanged, still"
    recall = "" if result.recall_at_10 is None else f", recall@10 {result.recall_at_10:.3f}"
    print(
        f"{verb} version {result.version}: {result.count} passages from {result.documents} documents, {result.index_type}{recall}",
        file=sys.stderr,
    )
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        print("spotrag index query: --top-k must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    _quiet_model_loading()
    _set_threads(args.threads)
    try:
        index = LoadedIndex.load(args.index)
        manifest = index.manifest
        embedder = Embedder(
            args.model or manifest.model,
            query_prefix=manifest.query_prefix,
            passage_prefix=manifest.passage_prefix,
            device=args.device,
        )
        index.check_compatible(embedder)
    except (IndexStoreError, ModelLoadError) as exc:
        print(f"spotrag index query: {exc}", file=sys.stderr)
        return EXIT_FAILED
    [hits] = index.search(embedder.embed_queries([args.question]), args.top_k)
    if args.json:
        rows = [
            {"rank": rank, "score": round(hit.score, 4), **hit.passage.__dict__}
            for rank, hit in enumerate(hits, start=1)
        ]
        print(json.dumps({"version": index.version, "question": args.question, "hits": rows}, ensure_ascii=False))
        return EXIT_OK
    print(f"index {index.path} (version {index.version}, {index.size} passages, {manifest.index_type})")
    for rank, hit in enumerate(hits, start=1):
        passage = hit.passage
        print(f"\n{rank}. {hit.score:.3f}  {passage.source} #{passage.position}")
        print(textwrap.indent(textwrap.shorten(passage.text, width=400, placeholder=" …"), "   "))
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    from ..retrieval.store import read_manifest, resolve_version_dir

    try:
        path = resolve_version_dir(args.index)
        manifest = read_manifest(path)
    except IndexStoreError as exc:
        print(f"spotrag index info: {exc}", file=sys.stderr)
        return EXIT_FAILED
    versions_dir = args.index / VERSIONS_DIR
    kept = (
        sorted(p.name for p in versions_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if versions_dir.is_dir()
        else []
    )
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "current": current_version(args.index),
                    "versions": kept,
                    "manifest": manifest.to_dict(),
                },
                ensure_ascii=False,
            )
        )
        return EXIT_OK
    print(f"index      {path}")
    for key, value in manifest.to_dict().items():
        print(f"{key:<18} {json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value}")
    if kept:
        current = current_version(args.index)
        print("versions   " + ", ".join(f"{name} (current)" if name == current else name for name in kept))
    return EXIT_OK


def _emit(data: dict[str, Any], result_file: Path | None) -> None:
    line = json.dumps(data, ensure_ascii=False, default=str)
    print(line, flush=True)
    if result_file is not None:
        try:
            result_file.write_text(line + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"spotrag index build: cannot write result file {result_file}: {exc.strerror}", file=sys.stderr)


def _set_threads(threads: int | None) -> None:
    import faiss

    faiss.omp_set_num_threads(set_torch_threads(threads))


def _quiet_model_loading() -> None:
    # transformers draws its own bar while loading weights; ours is the one that matters.
    import transformers

    transformers.utils.logging.disable_progress_bar()


class _Progress:
    """Progress on stderr: a rich bar, plain lines, JSON lines, or nothing."""

    def __init__(self, style: str, stream: TextIO) -> None:
        self.style = style
        self.stream = stream
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._last_step: dict[str, int] = {}

    def __enter__(self) -> _Progress:
        if self.style == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream),
            )  # fmt: skip
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, stage: str, done: int, total: int) -> None:
        if self.style == "bar":
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(stage, total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
            return
        if self.style == "none":
            return
        step = PROGRESS_STEPS if total == 0 else done * PROGRESS_STEPS // total
        if self._last_step.get(stage) == step:
            return
        self._last_step[stage] = step
        if self.style == "json":
            print(
                json.dumps({"event": "progress", "stage": stage, "done": done, "total": total}),
                file=self.stream,
                flush=True,
            )
        else:
            percent = 100 if total == 0 else 100 * done // total
            print(f"{stage}: {done}/{total} ({percent}%)", file=self.stream, flush=True)


def _progress_reporter(style: str, stream: TextIO) -> _Progress:
    if style == "auto":
        # rich is not in the index Job's image (no terminal there); plain lines without it.
        style = "bar" if stream.isatty() and importlib.util.find_spec("rich") else "plain"
    return _Progress(style, stream)
