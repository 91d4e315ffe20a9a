"""``spotrag node-agent``: watch this instance's interruption notice and mark its Node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .agent import (
    DEFAULT_DETECT_TIMEOUT_S,
    DEFAULT_LONG_POLL_S,
    DEFAULT_MAX_BACKOFF_S,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    Agent,
    AgentConfig,
    AgentConfigError,
)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotrag node-agent",
        description="Read this instance's spot interruption notice from the cloud's metadata service "
        "(AWS IMDSv2, GCE metadata, Azure Scheduled Events) and mark this node's Node object "
        "with the deadline (annotation spotrag.io/interruption and a NoSchedule taint).",
    )
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        help="this node's name (default: $NODE_NAME, from the downward API spec.nodeName)",
    )
    parser.add_argument(
        "--cloud",
        choices=("auto", "aws", "gcp", "azure"),
        default="auto",
        help="which metadata service to read; auto probes each briefly (default: auto)",
    )
    parser.add_argument(
        "--metadata-url",
        help="base URL of the metadata service, for every cloud "
        "(default: http://169.254.169.254, GCE http://metadata.google.internal)",
    )
    parser.add_argument(
        "--poll-interval",
        type=_positive,
        default=DEFAULT_POLL_INTERVAL_S,
        help="seconds between polls of AWS and Azure (GCE is long-polled) (default: %(default)s)",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    parser.add_argument(
        "--request-timeout",
        type=_positive,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a metadata request may take (default: %(default)s)",
    )
    parser.add_argument(
        "--long-poll",
        type=int,
        default=DEFAULT_LONG_POLL_S,
        metavar="SECONDS",
        help="how long one GCE long-poll is held (default: %(default)s)",
    )
    parser.add_argument(
        "--detect-timeout",
        type=_positive,
        default=DEFAULT_DETECT_TIMEOUT_S,
        help="seconds each cloud probe of --cloud auto may take (default: %(default)s)",
    )
    parser.add_argument(
        "--max-backoff",
        type=_positive,
        default=DEFAULT_MAX_BACKOFF_S,
        help="longest wait between retries of a failing endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--no-cloud",
        choices=("exit", "wait"),
        default="exit",
        help="on a node with no cloud metadata: exit 0, or wait for SIGTERM so a DaemonSet "
        "pod does not restart in a loop (default: exit)",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


async def _run(agent: Agent) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        return await agent.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: one line per poll is not "quiet when nothing happens".
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = AgentConfig(
            node_name=args.node_name or "",
            cloud=args.cloud,
            metadata_url=args.metadata_url,
            kubeconfig=args.kubeconfig,
            poll_interval=args.poll_interval,
            request_timeout=args.request_timeout,
            long_poll_s=args.long_poll,
            detect_timeout=args.detect_timeout,
            max_backoff=args.max_backoff,
            no_cloud=args.no_cloud,
        )
        return asyncio.run(_run(Agent(config)))
    except AgentConfigError as exc:
        print(f"spotrag node-agent: {exc}", file=sys.stderr)
        return 1
