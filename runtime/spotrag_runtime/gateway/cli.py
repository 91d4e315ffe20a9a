"""``spotrag gateway``: run the RAG gateway."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
from typing import Any

from spotrag_runtime.gateway.config import ConfigError, GatewayConfig, load_config

# Seconds in-flight answers may finish after SIGTERM (a pod's default grace is 30 s).
SHUTDOWN_GRACE_SECONDS = 25


def _default_host() -> str:
    # In a pod the Service must reach us; on a laptop, stay on loopback.
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


def raise_open_file_limit() -> None:
    """Two sockets per streaming request (client and engine) run past the
    usual soft limit of 1024 descriptors at a few hundred streams; take the
    hard limit, as vLLM's server does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotrag gateway",
        description=(
            "Run the RAG gateway: an OpenAI-compatible API that retrieves passages for each question, "
            "queues requests by tokens, picks engines and fails over between them."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="gateway.json as the operator renders it (the ConfigMap mounted at /etc/spotrag/gateway.json)",
    )
    parser.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients ask for (required without --config; overrides the config)",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default: 0.0.0.0 in a pod, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("SPOTRAG_GATEWAY_WORKERS", "1")),
        metavar="N",
        help=(
            "worker processes sharing the port, one per core the pod may use (default 1, or "
            "$SPOTRAG_GATEWAY_WORKERS); each takes 1/N of the admission limits, and /metrics adds them up"
        ),
    )
    parser.add_argument(
        "--engine-url",
        action="append",
        default=[],
        metavar="URL",
        help="an engine to use instead of discovery (repeat for more)",
    )
    parser.add_argument("--index", metavar="DIR", help="index root to load instead of retrieval.indexPath")
    parser.add_argument("--no-retrieval", action="store_true", help="plain OpenAI proxy: no index, no retrieval")
    parser.add_argument(
        "--kubeconfig", metavar="PATH", help="for EndpointSlice discovery out of a cluster (default: in-cluster config)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if args.config:
        config = load_config(args.config)
    elif args.served_model_name:
        config = GatewayConfig(served_model_name=args.served_model_name)
    else:
        raise ConfigError("give --config PATH, or at least --served-model-name NAME")
    mapping = config.to_mapping()
    if args.served_model_name:
        mapping["servedModelName"] = args.served_model_name
    if args.engine_url:
        mapping["engines"].update(discovery="static", urls=args.engine_url)
    if args.index:
        mapping["retrieval"]["indexPath"] = args.index
    if args.no_retrieval:
        mapping["retrieval"]["enabled"] = False
    return GatewayConfig.from_mapping(mapping)


def worker_share(config: GatewayConfig, workers: int) -> GatewayConfig:
    """One worker's part of the pod's admission limits: the pod as a whole
    keeps the configured limits (each worker admits on its own; the kernel
    spreads connections over them)."""
    if workers <= 1:
        return config
    mapping = config.to_mapping()
    admission = mapping["admission"]
    for key in ("maxInflightTokensPerEngine", "maxInflightRequestsPerEngine", "maxQueuedRequests"):
        admission[key] = max(1, math.ceil(admission[key] / workers))
    return GatewayConfig.from_mapping(mapping)


def run_workers(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Several worker processes on one listening socket (uvicorn's supervisor
    restarts one that dies), their metrics shared through a directory."""
    import uvicorn

    from spotrag_runtime.gateway.app import WORKER_CONFIG_ENV

    metrics_dir = tempfile.mkdtemp(prefix="spotrag-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[WORKER_CONFIG_ENV] = json.dumps(
        {
            "config": worker_share(config, args.workers).to_mapping(),
            "kubeconfig": args.kubeconfig,
            "workers": args.workers,
            "logLevel": args.log_level,
        }
    )
    try:
        uvicorn.run(
            "spotrag_runtime.gateway.app:app_from_environment",
            factory=True,
            workers=args.workers,
            host=args.host or _default_host(),
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"spotrag gateway: {error}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("spotrag gateway: --workers must be 1 or more", file=sys.stderr)
        return 2
    raise_open_file_limit()
    if args.workers > 1:
        return run_workers(config, args)
    from spotrag_runtime.gateway.app import create_app

    return serve(create_app(config, kubeconfig=args.kubeconfig), args)


def serve(app: Any, args: argparse.Namespace) -> int:
    """Serve ``app`` in the foreground (the gateway, the front door) until SIGTERM,
    letting answers in flight finish; 1 when it never started."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host or _default_host(),
            port=args.port,
            log_level=args.log_level,
            access_log=False,  # paths only, but a log line per request costs CPU at load
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    )
    server.run()
    # uvicorn reports a failed start (index or model not loadable, port taken) by not starting.
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
