"""The engine pod's node-level model cache, chosen before vLLM starts.

`spotrag model-cache prepare` runs as the engine pod's init container (the
spotrag runtime image; the engine container stays the upstream `vllm serve`).
It checks that the node's cache folder (a hostPath shared by the engines on
the node) can be written and has the free space asked for, and points a
symlink the engine's HF_HOME and VLLM_CACHE_ROOT go through at it; if not,
at the pod's own emptyDir, so the engine still starts, loading from the
source. Why is written to the termination message, where the operator reads
it and posts a ModelCacheUnusable Event on the RAGDeployment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
USING_NODE_CACHE = "using the node's model cache"
# The operator recognises an unusable cache by this prefix of the termination message.
UNUSABLE = "node model cache unusable: "


@dataclass(frozen=True)
class Choice:
    target: Path
    problem: str | None  # why the node cache was not used; None when it was

    @property
    def message(self) -> str:
        if self.problem is None:
            return f"{USING_NODE_CACHE} ({self.target})"
        return f"{UNUSABLE}{self.problem}; loading from the source into the pod's own volume ({self.target})"


def node_cache_problem(node: Path, *, min_free_bytes: int) -> str | None:
    """Why the node's cache folder cannot take the weights (None: it can)."""
    try:
        node.mkdir(parents=True, exist_ok=True)
        probe = node / f".spotrag-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        return f"{node} cannot be written ({error.strerror or error})"
    free = shutil.disk_usage(node).free
    if free < min_free_bytes:
        return f"{node} has {free / GIB:.1f} GiB free, less than the {min_free_bytes / GIB:.0f} GiB asked (minFreeGi)"
    return None


def prepare(node: Path, pod: Path, link: Path, *, min_free_bytes: int) -> Choice:
    """Point `link` at the node cache if usable, else at the pod's own folder."""
    problem = node_cache_problem(node, min_free_bytes=min_free_bytes)
    target = node if problem is None else pod
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(link.name + ".new")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, link)  # a restarted init container re-points it in one step
    return Choice(target, problem)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotrag model-cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("prepare", help="choose the node cache or the pod's own folder for the engine")
    run.add_argument("--node", type=Path, required=True, help="the node's cache folder (hostPath mount)")
    run.add_argument("--pod", type=Path, required=True, help="the pod's own folder (emptyDir mount)")
    run.add_argument("--link", type=Path, required=True, help="the symlink HF_HOME and VLLM_CACHE_ROOT go through")
    run.add_argument("--min-free-gi", type=int, default=0)
    run.add_argument("--message-file", type=Path, default=Path("/dev/termination-log"))
    args = parser.parse_args(argv)
    choice = prepare(args.node, args.pod, args.link, min_free_bytes=args.min_free_gi * GIB)
    print(choice.message)
    try:
        args.message_file.write_text(choice.message)
    except OSError as error:
        print(f"could not write {args.message_file}: {error}", file=sys.stderr)
    return 0  # never block the engine: an unusable cache only makes it slower
