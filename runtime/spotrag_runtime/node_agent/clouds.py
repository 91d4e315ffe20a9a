"""What each cloud's metadata service says, reduced to a Notice: pure functions.

One parser per endpoint, each taking the response body (None where the
endpoint answered 404, which is how AWS says "no notice") and the detection
time, and returning a Notice or None. A body that is neither a notice nor
"no notice" raises UnrecognisedResponse. A notice whose time cannot be read
is still a notice: its deadline is the detection time ("now") and its
``warning`` says why, because a drain must never assume it has time.

Endpoints (paths relative to the metadata base URL):

- AWS IMDSv2: ``PUT /latest/api/token`` (header
  ``X-aws-ec2-metadata-token-ttl-seconds``), then GETs with
  ``X-aws-ec2-metadata-token``: ``/latest/meta-data/spot/instance-action``
  (404 until a notice, then ``{"action": ..., "time": ...}``) and
  ``/latest/meta-data/events/recommendations/rebalance`` (``{"noticeTime": ...}``).
- GCE (header ``Metadata-Flavor: Google``): ``/computeMetadata/v1/instance/preempted``
  (``TRUE``/``FALSE``) and ``.../instance/maintenance-event``, both long-polled
  with ``wait_for_change=true``.
- Azure (header ``Metadata: true``):
  ``/metadata/scheduledevents?api-version=2020-07-01``, events of every VM in
  the availability set or scale-set placement group, so they are filtered by
  this VM's name.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Iterable
from datetime import UTC, datetime

from .mark import Kind, Notice, default_deadline, parse_rfc3339

# AWS
AWS_TOKEN_PATH = "/latest/api/token"
AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
# GCE
GCE_HEADERS = {"Metadata-Flavor": "Google"}
GCE_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCE_MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
GCE_ID_PATH = "/computeMetadata/v1/instance/id"
# Azure
AZURE_HEADERS = {"Metadata": "true"}
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_EVENTS_API_VERSION = "2020-07-01"
AZURE_NAME_PATH = "/metadata/instance/compute/name"
AZURE_INSTANCE_API_VERSION = "2021-02-01"

# Azure event types that take this VM away, and how. Freeze (a pause of a few
# seconds) and types we do not know are not worth a drain.
AZURE_EVENT_KINDS: dict[str, Kind] = {
    "Preempt": "interruption",  # spot eviction
    "Terminate": "interruption",  # scale-set delete with a terminate notification
    "Reboot": "maintenance",
    "Redeploy": "maintenance",  # moved to another host: the local disk and GPU state are lost
}


class UnrecognisedResponse(ValueError):
    """The metadata service answered something that is neither a notice nor "no notice"."""


def _deadline(
    raw: object, *, cloud: str, kind: str, detected: datetime, parse=parse_rfc3339
) -> tuple[datetime, str | None]:
    """The notice's own time when it gives one; the cloud's default notice when it gives none; now when unreadable."""
    if raw is None or raw == "":
        return default_deadline(cloud, kind, detected), None
    try:
        return parse(raw), None
    except (ValueError, TypeError):
        return detected, f"notice time {raw!r} is not a time; treated as now"


def parse_aws_instance_action(body: str | None, *, detected: datetime) -> Notice | None:
    """``spot/instance-action``: 404 (None) until AWS decides to terminate, stop or hibernate."""
    if body is None:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        # The item exists only when an action is scheduled, so even an
        # unreadable one means the instance is going.
        return Notice(
            kind="interruption",
            cloud="aws",
            deadline=detected,
            detected=detected,
            ref=f"instance-action {body.strip()[:80]}",
            warning=f"spot/instance-action is not a JSON object: {body[:80]!r}; treated as now",
        )
    action, raw_time = data.get("action"), data.get("time")
    deadline, warning = _deadline(raw_time, cloud="aws", kind="interruption", detected=detected)
    return Notice(
        kind="interruption",
        cloud="aws",
        deadline=deadline,
        detected=detected,
        ref=f"instance-action {action} {raw_time}",
        warning=warning,
    )


def parse_aws_rebalance(body: str | None, *, detected: datetime) -> Notice | None:
    """``events/recommendations/rebalance``: a pre-warm hint, no deadline of its own.

    Its ``noticeTime`` is when AWS issued it, not when the instance goes; the
    instance can go no sooner than one interruption notice (2 minutes) later.
    """
    if body is None:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    notice_time = data.get("noticeTime") if isinstance(data, dict) else None
    warning = None if notice_time else f"rebalance recommendation without noticeTime: {body[:80]!r}"
    return Notice(
        kind="rebalance",
        cloud="aws",
        deadline=default_deadline("aws", "rebalance", detected),
        detected=detected,
        ref=f"rebalance {notice_time or body.strip()[:80]}",
        warning=warning,
    )


def parse_gce_preempted(body: str, *, detected: datetime) -> Notice | None:
    """``instance/preempted``: ``TRUE`` once the spot VM is being stopped (30 s)."""
    value = body.strip().upper()
    if value == "FALSE":
        return None
    if value == "TRUE":
        return Notice(
            kind="interruption",
            cloud="gcp",
            deadline=default_deadline("gcp", "interruption", detected),
            detected=detected,
            ref="preempted",
        )
    raise UnrecognisedResponse(f"instance/preempted answered {body[:80]!r}, expected TRUE or FALSE")


def parse_gce_maintenance_event(body: str, *, detected: datetime) -> Notice | None:
    """``instance/maintenance-event``: a host maintenance that stops this VM is a notice.

    ``MIGRATE_ON_HOST_MAINTENANCE`` is a live migration: the VM keeps running
    (GPU VMs are never live-migrated), so it is no reason to drain.
    """
    value = body.strip().upper()
    if value in ("NONE", "MIGRATE_ON_HOST_MAINTENANCE"):
        return None
    if value == "TERMINATE_ON_HOST_MAINTENANCE":
        return Notice(
            kind="maintenance",
            cloud="gcp",
            deadline=default_deadline("gcp", "maintenance", detected),
            detected=detected,
            ref=f"maintenance-event {value}",
        )
    raise UnrecognisedResponse(f"instance/maintenance-event answered {body[:80]!r}")


def _parse_azure_time(raw: object) -> datetime:
    """Azure writes NotBefore as RFC 1123 (``Mon, 19 Sep 2016 18:29:47 GMT``); accept RFC 3339 too."""
    if not isinstance(raw, str):
        raise ValueError(f"not a time: {raw!r}")
    try:
        moment = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return parse_rfc3339(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # RFC 1123 "GMT" parses as naive UTC on some inputs
    return moment.astimezone(UTC)


def _names_this_vm(resources: object, vm_name: str | None) -> bool:
    # No name to compare, or an event naming no VM: take it as ours. Draining
    # for a neighbour's event costs a replacement; missing ours costs requests.
    if vm_name is None or not isinstance(resources, list) or not resources:
        return True
    # Scale-set instances may be listed with a leading underscore (unverified).
    wanted = vm_name.lstrip("_").lower()
    return any(isinstance(r, str) and r.lstrip("_").lower() == wanted for r in resources)


def parse_azure_scheduled_events(body: str, *, detected: datetime, vm_name: str | None = None) -> Notice | None:
    """``scheduledevents``: the most severe (then earliest) event for this VM, or None."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UnrecognisedResponse(f"scheduledevents is not JSON: {body[:80]!r}") from exc
    events = data.get("Events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise UnrecognisedResponse(f"scheduledevents has no Events list: {body[:80]!r}")
    notices = []
    for event in events:
        if not isinstance(event, dict):
            continue
        kind = AZURE_EVENT_KINDS.get(event.get("EventType"))
        if kind is None or not _names_this_vm(event.get("Resources"), vm_name):
            continue
        not_before = event.get("NotBefore")
        if not not_before and event.get("EventStatus") == "Started":
            deadline, warning = detected, None  # already happening
        else:
            deadline, warning = _deadline(
                not_before, cloud="azure", kind=kind, detected=detected, parse=_parse_azure_time
            )
        notices.append(
            Notice(
                kind=kind,
                cloud="azure",
                deadline=deadline,
                detected=detected,
                ref=f"{event.get('EventType')} {event.get('EventId')}",
                warning=warning,
            )
        )
    return most_urgent(notices)


def most_urgent(notices: Iterable[Notice | None]) -> Notice | None:
    """The notice a drain must follow: the most severe, then the earliest deadline."""
    present = [n for n in notices if n is not None]
    if not present:
        return None
    return max(present, key=lambda n: (n.severity, -n.deadline.timestamp()))
