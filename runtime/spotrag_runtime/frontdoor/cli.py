"""``spotrag front-door``: one OpenAI-compatible endpoint for many RAGDeployments."""

from __future__ import annotations

import argparse
import logging
import sys

from spotrag_runtime.frontdoor.config import ConfigError, FrontDoorConfig, StaticBackend, load_config
from spotrag_runtime.gateway.cli import raise_open_file_limit, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotrag front-door",
        description=(
            "Route OpenAI requests by their model to RAGDeployments' gateways, split a model's traffic "
            "between RAGDeployments by weight (ModelRoute), check API keys once, apply moderation."
        ),
    )
    parser.add_argument("--config", metavar="PATH", help="the front door's config file (JSON or YAML)")
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="MODEL=URL[@WEIGHT]",
        help="serve MODEL from the gateway at URL (no Kubernetes; repeat, also for a split)",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default: 0.0.0.0 in a pod, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--kubeconfig", metavar="PATH", help="out of a cluster (default: in-cluster config)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def parse_backend(text: str, index: int) -> StaticBackend:
    model, sep, rest = text.partition("=")
    if not sep or not model or not rest:
        raise ConfigError(f"--backend {text!r}: expected MODEL=URL[@WEIGHT]")
    url, _, weight = rest.partition("@")
    try:
        return StaticBackend(model=model, ragdeployment=f"{model}-{index}", url=url, weight=int(weight or 1))
    except ValueError:
        raise ConfigError(f"--backend {text!r}: the weight must be an integer") from None


def config_from_args(args: argparse.Namespace) -> FrontDoorConfig:
    config = load_config(args.config) if args.config else FrontDoorConfig()
    if args.backend:
        backends = tuple(parse_backend(text, i) for i, text in enumerate(args.backend))
        config = FrontDoorConfig(**{**config.__dict__, "static": backends})
    return config


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"spotrag front-door: {error}", file=sys.stderr)
        return 2
    from spotrag_runtime.frontdoor.app import create_app

    raise_open_file_limit()
    return serve(create_app(config, kubeconfig=args.kubeconfig), args)


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
