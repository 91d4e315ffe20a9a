"""Server-side printing: the ``meta.k8s.io/v1`` Table that ``kubectl get`` asks for.

kubectl sends ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io`` and prints
the columns the server chooses. For custom resources those are the CRD's
``additionalPrinterColumns`` (Name + the declared ones, or Name + Age when none
are declared), evaluated with the simple JSONPath subset CRDs use. A few
built-in kinds get the columns a real server prints for them; the rest get
Name + Age.
"""

import datetime
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

TABLE_API_VERSION = "meta.k8s.io/v1"
NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "priority": 0,
    "description": "Name must be unique within a namespace. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
}
AGE_COLUMN = {
    "name": "Age",
    "type": "date",
    "format": "",
    "priority": 0,
    "description": "CreationTimestamp is a timestamp representing the server time when this object was created.",
}


class JSONPathError(ValueError):
    pass


# Segments of the JSONPath subset: .field, ['field'], [3], [*], [?(@.a.b == "x")]
_SEGMENT = re.compile(
    r"""
    \.(?P<field>[A-Za-z0-9_\-/]+)
  | \[['"](?P<quoted>[^'"]+)['"]\]
  | \[(?P<index>-?\d+)\]
  | \[\*\]|\.\*(?P<wild>)
  | \[\?\(@(?P<filter_path>(?:\.[A-Za-z0-9_\-]+)+)\s*(?P<filter_op>==|!=|<=|>=|<|>)\s*(?P<filter_value>[^)]+)\)\]
""",
    re.VERBOSE,
)


def jsonpath_find(obj: Any, path: str) -> list[Any]:
    """All values the path selects (k8s.io/client-go/util/jsonpath, simple subset)."""
    expression = path.strip()
    if expression.startswith("{") and expression.endswith("}"):
        expression = expression[1:-1]
    if expression.startswith("$"):
        expression = expression[1:]
    values = [obj]
    position = 0
    while position < len(expression):
        match = _SEGMENT.match(expression, position)
        if match is None:
            raise JSONPathError(f"unsupported JSONPath {path!r} at {expression[position:]!r}")
        values = _step(values, match)
        position = match.end()
    return values


def _step(values: list[Any], match: re.Match[str]) -> list[Any]:
    found: list[Any] = []
    field = match["field"] or match["quoted"]
    for value in values:
        if field is not None:
            if isinstance(value, Mapping) and field in value:
                found.append(value[field])
        elif match["index"] is not None:
            index = int(match["index"])
            if isinstance(value, list) and -len(value) <= index < len(value):
                found.append(value[index])
        elif match["filter_path"] is not None:
            if isinstance(value, list):
                found.extend(item for item in value if _filter_matches(item, match))
        elif isinstance(value, Mapping):  # wildcard
            found.extend(value.values())
        elif isinstance(value, list):
            found.extend(value)
    return found


def _filter_matches(item: Any, match: re.Match[str]) -> bool:
    actual = jsonpath_find(item, match["filter_path"])
    if not actual:
        return False
    raw = match["filter_value"].strip()
    expected: Any = raw[1:-1] if raw[:1] in ('"', "'") else json.loads(raw)
    compare: dict[str, Callable[[Any, Any], bool]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
    }
    try:
        return compare[match["filter_op"]](actual[0], expected)
    except TypeError:
        return False


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, as kubectl prints ages."""
    total = int(seconds)
    if total < -1:
        return "<invalid>"
    if total < 0:
        return "0s"
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = total // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age_of(timestamp: Any, now: datetime.datetime) -> str:
    if not isinstance(timestamp, str):
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((now - then).total_seconds())


def _cell(column_type: str, values: list[Any], now: datetime.datetime) -> Any:
    """One cell of a CRD column (apiextensions-apiserver tableconvertor.cellForJSONValue)."""
    if not values:
        return None
    value = values[0]
    match column_type:
        case "string":
            if isinstance(value, str):
                return value
            if isinstance(value, bool):
                return "true" if value else "false"
            return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)
        case "integer":
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        case "number":
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        case "boolean":
            return value if isinstance(value, bool) else None
        case "date":
            return age_of(value, now)
    return None


def custom_resource_columns(version: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Callable[..., list[Any]]]:
    """Column definitions and a row function from one CRD version's printer columns."""
    declared = version.get("additionalPrinterColumns") or []
    if not declared:
        return [NAME_COLUMN, AGE_COLUMN], lambda obj, now: [
            obj["metadata"]["name"],
            age_of(obj["metadata"].get("creationTimestamp"), now),
        ]
    definitions = [NAME_COLUMN] + [
        {
            "name": column["name"],
            "type": column.get("type", "string"),
            "format": column.get("format", ""),
            "description": column.get("description", ""),
            "priority": column.get("priority", 0),
        }
        for column in declared
    ]

    def row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in declared:
            try:
                values = jsonpath_find(obj, column["jsonPath"])
            except JSONPathError:
                values = []
            cells.append(_cell(column.get("type", "string"), values, now))
        return cells

    return definitions, row


def _column(name: str, column_type: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": column_type, "format": "", "description": "", "priority": priority}


def _pod_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for container in statuses if container.get("ready"))
    restarts = sum(container.get("restartCount", 0) for container in statuses)
    reason = status.get("reason") or status.get("phase") or "Pending"
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
    if obj["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return [
        obj["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        reason,
        restarts,
        age_of(obj["metadata"].get("creationTimestamp"), now),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
    ]


def _node_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    state = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    if (obj.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = obj["metadata"].get("labels") or {}
    roles = sorted(key.split("/", 1)[1] for key in labels if key.startswith("node-role.kubernetes.io/"))
    version = ((obj.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")
    return [
        obj["metadata"]["name"],
        state,
        ",".join(roles) or "<none>",
        age_of(obj["metadata"].get("creationTimestamp"), now),
        version,
    ]


def _deployment_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        age_of(obj["metadata"].get("creationTimestamp"), now),
    ]


def _namespace_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    return [
        obj["metadata"]["name"],
        (obj.get("status") or {}).get("phase", "Active"),
        age_of(obj["metadata"].get("creationTimestamp"), now),
    ]


def _service_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    spec = obj.get("spec") or {}
    ports = ",".join(f"{port.get('port')}/{port.get('protocol', 'TCP')}" for port in spec.get("ports") or [])
    return [
        obj["metadata"]["name"],
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP") or "<none>",
        "<none>",
        ports or "<none>",
        age_of(obj["metadata"].get("creationTimestamp"), now),
    ]


def _event_row(obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    """core/v1 and events.k8s.io/v1 Events, as ``kubectl get events`` lists them."""
    regarding = obj.get("involvedObject") or obj.get("regarding") or {}
    last_seen = (
        obj.get("lastTimestamp")
        or obj.get("deprecatedLastTimestamp")
        or obj.get("eventTime")
        or obj["metadata"].get("creationTimestamp")
    )
    return [
        age_of(last_seen, now),
        obj.get("type", ""),
        obj.get("reason", ""),
        f"{str(regarding.get('kind', '')).lower()}/{regarding.get('name', '')}",
        obj.get("message") or obj.get("note") or "",
        obj["metadata"]["name"],
    ]


BUILTIN_COLUMNS: dict[str, tuple[list[dict[str, Any]], Callable[..., list[Any]]]] = {
    "Pod": (
        [
            NAME_COLUMN,
            _column("Ready"),
            _column("Status"),
            _column("Restarts", "integer"),
            AGE_COLUMN,
            _column("IP", priority=1),
            _column("Node", priority=1),
        ],
        _pod_row,
    ),
    "Node": ([NAME_COLUMN, _column("Status"), _column("Roles"), AGE_COLUMN, _column("Version")], _node_row),
    "Deployment": (
        [NAME_COLUMN, _column("Ready"), _column("Up-to-date", "integer"), _column("Available", "integer"), AGE_COLUMN],
        _deployment_row,
    ),
    "Namespace": ([NAME_COLUMN, _column("Status"), AGE_COLUMN], _namespace_row),
    "Event": (
        [
            _column("Last Seen"),
            _column("Type"),
            _column("Reason"),
            _column("Object"),
            _column("Message"),
            {**NAME_COLUMN, "priority": 1},
        ],
        _event_row,
    ),
    "Service": (
        [NAME_COLUMN, _column("Type"), _column("Cluster-IP"), _column("External-IP"), _column("Port(s)"), AGE_COLUMN],
        _service_row,
    ),
}
DEFAULT_COLUMNS: tuple[list[dict[str, Any]], Callable[..., list[Any]]] = (
    [NAME_COLUMN, AGE_COLUMN],
    lambda obj, now: [obj["metadata"]["name"], age_of(obj["metadata"].get("creationTimestamp"), now)],
)


def build_table(
    objects: Sequence[Mapping[str, Any]],
    *,
    columns: tuple[list[dict[str, Any]], Callable[..., list[Any]]],
    resource_version: str,
    include_object: str = "Metadata",
    continue_token: str | None = None,
) -> dict[str, Any]:
    """A Table of the objects; ``include_object`` is the request's includeObject (None/Metadata/Object)."""
    definitions, row_of = columns
    now = datetime.datetime.now(datetime.UTC)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": row_of(obj, now)}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": TABLE_API_VERSION,
                "metadata": obj["metadata"],
            }
        rows.append(row)
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        metadata["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": TABLE_API_VERSION,
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    }


def wants_table(accept: str | None) -> bool:
    """Whether the Accept header asks for a meta.k8s.io Table first."""
    if not accept:
        return False
    first = accept.split(",")[0]
    parameters = {
        part.split("=", 1)[0].strip(): part.split("=", 1)[1].strip() for part in first.split(";")[1:] if "=" in part
    }
    return parameters.get("as") == "Table" and parameters.get("g") == "meta.k8s.io"
