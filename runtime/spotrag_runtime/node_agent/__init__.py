"""The node agent: reads this instance's spot interruption notice and marks its Node.

``spotrag node-agent`` (``main.cli``) runs it as a DaemonSet on spot GPU
nodes. The operator imports only ``mark``, the node side of the contract:

    from spotrag_runtime.node_agent.mark import ANNOTATION, TAINT_KEY, parse_node_mark

The parsing of each cloud's answers is pure (``clouds``), and so is the
decision what to write (``node.plan_mark``, ``node.mark_patch``).
"""

from .clouds import (
    UnrecognisedResponse,
    most_urgent,
    parse_aws_instance_action,
    parse_aws_rebalance,
    parse_azure_scheduled_events,
    parse_gce_maintenance_event,
    parse_gce_preempted,
)
from .mark import ANNOTATION, DEFAULT_NOTICE, TAINT_EFFECT, TAINT_KEY, InvalidNodeMark, Notice, parse_node_mark, rfc3339


def cli(argv: list[str]) -> int:
    """``spotrag node-agent``; imported lazily so the operator's import of ``mark`` stays light."""
    from .main import cli as run

    return run(argv)


__all__ = [
    "ANNOTATION",
    "DEFAULT_NOTICE",
    "TAINT_EFFECT",
    "TAINT_KEY",
    "InvalidNodeMark",
    "Notice",
    "UnrecognisedResponse",
    "cli",
    "most_urgent",
    "parse_aws_instance_action",
    "parse_aws_rebalance",
    "parse_azure_scheduled_events",
    "parse_gce_maintenance_event",
    "parse_gce_preempted",
    "parse_node_mark",
    "rfc3339",
]
