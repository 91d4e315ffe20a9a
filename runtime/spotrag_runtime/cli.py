"""The `spotrag` command: one entry point, a subcommand per part.

Each subcommand lives with the part it runs and is imported only when used,
so `spotrag operator` never loads torch and `spotrag gateway` never loads kopf.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("spotrag_operator.main:cli", "run the operator against a cluster"),
    "gateway": ("spotrag_runtime.gateway.cli:cli", "run the RAG gateway (OpenAI-compatible API)"),
    "front-door": (
        "spotrag_runtime.frontdoor.cli:cli",
        "one OpenAI endpoint for many RAGDeployments (routing, splits, moderation)",
    ),
    "index": ("spotrag_runtime.index.cli:cli", "build, query and inspect a retrieval index"),
    "node-agent": ("spotrag_runtime.node_agent.main:cli", "mark this node when the cloud gives a spot notice"),
    "model-cache": (
        "spotrag_runtime.model_cache:cli",
        "point an engine at its node's model cache, or its own volume if that cache is unusable",
    ),
    "engine-emulator": ("spotrag_runtime.engine_emulator.cli:cli", "run a vLLM API emulator (no GPU needed)"),
    "api-server": ("spotrag_box.apiserver.server:cli", "run the Kubernetes API stand-in"),
    "demo": ("spotrag_box.demo:cli", "the tour: operator, gateway and engines in a simulated cluster"),
    "simulate": (
        "spotrag_simulator.cli:cli",
        "simulate a traffic trace under spotrag's autoscaling and its alternatives",
    ),
}


def usage() -> str:
    lines = ["usage: spotrag <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'spotrag <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"spotrag: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    run = getattr(importlib.import_module(module_name), function)
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
