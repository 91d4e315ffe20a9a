"""`spotrag operator`: run the kopf operator against the current cluster."""

from __future__ import annotations

import argparse
import logging
import os
import secrets


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spotrag operator", description="Run the spotrag operator (kopf) against a cluster."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch RAGDeployments in every namespace (the default)"
    )
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG or ~/.kube/config)"
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no peering: run as the only operator (no leader election)"
    )
    parser.add_argument(
        "--peering", default="spotrag", help="kopf peering name shared by the replicas for HA (default: spotrag)"
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL, or '' to disable"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="port of the Prometheus /metrics endpoint (0 to disable; default 9090)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=10.0,
        help="seconds between periodic reconciles of each RAGDeployment (default 10)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.reconcile_interval <= 0:
        parser.error("--reconcile-interval must be positive")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import kopf
    import prometheus_client

    from .handlers import OperatorConfig, register

    config = OperatorConfig(
        # The `kubernetes` package reads $KUBECONFIG once, at its import: name it now.
        kubeconfig=args.kubeconfig or os.environ.get("KUBECONFIG"),
        reconcile_interval=args.reconcile_interval,
    )
    registry = kopf.OperatorRegistry()
    register(registry, config)
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    kopf.run(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        # kopf pauses every replica that shares the highest priority, so each
        # replica draws its own: the highest one is active, the others stand by.
        priority=0 if args.standalone else secrets.randbelow(1_000_000) + 1,
        liveness_endpoint=args.liveness or None,
    )
    return 0
