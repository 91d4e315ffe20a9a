"""The node side of the interruption contract: what the node agent writes on its Node.

The agent writes, the operator reads; both import this module so the names
and the format cannot drift.

- annotation ``spotrag.io/interruption``: JSON ``{"kind", "cloud", "deadline",
  "detected", "source", "ref"[, "warning"]}``, times in RFC 3339 UTC;
- taint ``spotrag.io/interruption=<kind>:NoSchedule`` for the kinds that take
  the node away (interruption, maintenance); a rebalance recommendation is a
  pre-warm hint and gets the annotation only.

This module loads only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

ANNOTATION = "spotrag.io/interruption"
TAINT_KEY = "spotrag.io/interruption"
TAINT_EFFECT = "NoSchedule"
SOURCE = "node-agent"

Kind = Literal["interruption", "maintenance", "rebalance"]
KINDS: tuple[Kind, ...] = ("interruption", "maintenance", "rebalance")
# Kinds whose node goes away: these get the NoSchedule taint.
TAINTING_KINDS = frozenset({"interruption", "maintenance"})
# Higher wins when two notices are active at once: a rebalance never hides an
# interruption that came with it.
SEVERITY: dict[str, int] = {"rebalance": 1, "maintenance": 2, "interruption": 3}

Cloud = Literal["aws", "gcp", "azure"]
CLOUDS: tuple[Cloud, ...] = ("aws", "gcp", "azure")

# How long a cloud gives between its notice and the instance going, used when
# the notice carries no time. A rebalance recommendation has no deadline of its
# own; the instance can go no sooner than one interruption notice later.
DEFAULT_NOTICE: dict[tuple[str, str], timedelta] = {
    ("aws", "interruption"): timedelta(seconds=120),
    ("aws", "rebalance"): timedelta(seconds=120),
    ("gcp", "interruption"): timedelta(seconds=30),
    ("gcp", "maintenance"): timedelta(seconds=60),
    ("azure", "interruption"): timedelta(seconds=30),
    ("azure", "maintenance"): timedelta(seconds=30),
}


class InvalidNodeMark(ValueError):
    """The annotation is there but is not a mark this module can read."""


@dataclasses.dataclass(frozen=True)
class Notice:
    """One interruption notice, reduced to what a drain needs.

    ``ref`` names the notice as the cloud stated it (action and time, event
    id...): the same notice seen again has the same ref, which is what makes
    marking idempotent even when the deadline had to be derived.
    """

    kind: Kind
    cloud: Cloud
    deadline: datetime
    detected: datetime
    ref: str
    source: str = SOURCE
    warning: str | None = None

    @property
    def taints(self) -> bool:
        return self.kind in TAINTING_KINDS

    @property
    def severity(self) -> int:
        return SEVERITY[self.kind]

    def taint(self) -> dict[str, str] | None:
        """The Node taint for this notice, or None for a pre-warm hint."""
        if not self.taints:
            return None
        return {"key": TAINT_KEY, "value": self.kind, "effect": TAINT_EFFECT}

    def to_annotation(self) -> str:
        body: dict[str, Any] = {
            "kind": self.kind,
            "cloud": self.cloud,
            "deadline": rfc3339(self.deadline),
            "detected": rfc3339(self.detected),
            "source": self.source,
            "ref": self.ref,
        }
        if self.warning:
            body["warning"] = self.warning
        return json.dumps(body, separators=(",", ":"))

    def same_notice(self, other: Notice | None) -> bool:
        """True when ``other`` is this notice again (detection time aside)."""
        return other is not None and (self.kind, self.cloud, self.ref) == (other.kind, other.cloud, other.ref)


def default_deadline(cloud: str, kind: str, detected: datetime) -> datetime:
    return detected + DEFAULT_NOTICE.get((cloud, kind), timedelta(seconds=30))


def rfc3339(moment: datetime) -> str:
    """UTC, ``Z`` suffix, milliseconds only when there are any."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time with an offset or ``Z``; ValueError otherwise (naive times are ambiguous)."""
    if not isinstance(text, str):
        raise ValueError(f"not a time: {text!r}")
    moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if moment.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    return moment.astimezone(UTC)


def parse_node_mark(annotations: Mapping[str, str] | None, *, now: datetime | None = None) -> Notice | None:
    """The node agent's notice from a Node's annotations, or None when it has none.

    An unreadable deadline means "now" (a drain must not assume it has time),
    with ``warning`` saying why, as for any other signal. Raises InvalidNodeMark
    when the annotation is not JSON of this shape at all.
    """
    raw = (annotations or {}).get(ANNOTATION)
    if raw is None:
        return None
    now = now or datetime.now(UTC)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidNodeMark(f"annotation {ANNOTATION} is not JSON: {raw[:200]!r}") from exc
    if not isinstance(body, dict):
        raise InvalidNodeMark(f"annotation {ANNOTATION} is not a JSON object: {raw[:200]!r}")
    kind, cloud = body.get("kind"), body.get("cloud")
    if kind not in KINDS:
        raise InvalidNodeMark(f"annotation {ANNOTATION}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if cloud not in CLOUDS:
        raise InvalidNodeMark(f"annotation {ANNOTATION}: cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
    warnings = [body["warning"]] if isinstance(body.get("warning"), str) else []
    try:
        detected = parse_rfc3339(body.get("detected"))
    except ValueError:
        detected = now
        warnings.append(f"detected time {body.get('detected')!r} is not RFC 3339; using now")
    try:
        deadline = parse_rfc3339(body.get("deadline"))
    except ValueError:
        deadline = now
        warnings.append(f"deadline {body.get('deadline')!r} is not RFC 3339; treated as now")
    return Notice(
        kind=kind,
        cloud=cloud,
        deadline=deadline,
        detected=detected,
        ref=str(body.get("ref", "")),
        source=str(body.get("source", SOURCE)),
        warning="; ".join(warnings) or None,
    )
