"""Just enough of Kubernetes' protobuf encoding to read what typed Go clients send.

client-go's typed clientsets (the ones helm keeps its releases with, in Secrets)
send request bodies as ``application/vnd.kubernetes.protobuf``: the magic
``k8s\\0`` and a ``runtime.Unknown`` envelope around the object's own message.
This decodes the few kinds those clients write — Secret, ConfigMap and
DeleteOptions, with ObjectMeta — into the JSON form the rest of the server
uses. Field numbers are those of k8s.io/api's and apimachinery's generated.proto.
Anything else is refused with a clear error rather than guessed at.
"""

import base64
import datetime
from collections.abc import Iterator
from typing import Any

CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"


class ProtobufUnsupported(ValueError):
    """A body this decoder cannot read (unknown kind or malformed)."""


# Message schemas: field number -> (JSON name, type). Types: 'string', 'bytes', 'int', 'bool',
# 'raw' (bytes kept as bytes), 'time', a message name, 'map:string' / 'map:bytes', and a trailing '[]' for repeated fields.
_SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {
        1: ("typeMeta", "TypeMeta"),
        2: ("raw", "raw"),
        3: ("contentEncoding", "string"),
        4: ("contentType", "string"),
    },
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {
        1: ("name", "string"),
        2: ("generateName", "string"),
        3: ("namespace", "string"),
        5: ("uid", "string"),
        6: ("resourceVersion", "string"),
        7: ("generation", "int"),
        8: ("creationTimestamp", "time"),
        9: ("deletionTimestamp", "time"),
        10: ("deletionGracePeriodSeconds", "int"),
        11: ("labels", "map:string"),
        12: ("annotations", "map:string"),
        13: ("ownerReferences", "OwnerReference[]"),
        14: ("finalizers", "string[]"),
    },
    "OwnerReference": {
        1: ("kind", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("controller", "bool"),
        7: ("blockOwnerDeletion", "bool"),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:bytes"),
        3: ("type", "string"),
        4: ("stringData", "map:string"),
        5: ("immutable", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:string"),
        3: ("binaryData", "map:bytes"),
        4: ("immutable", "bool"),
    },
    "DeleteOptions": {
        1: ("gracePeriodSeconds", "int"),
        2: ("preconditions", "Preconditions"),
        3: ("orphanDependents", "bool"),
        4: ("propagationPolicy", "string"),
        5: ("dryRun", "string[]"),
    },
    "Preconditions": {1: ("uid", "string"), 2: ("resourceVersion", "string")},
}
DECODABLE_KINDS = frozenset({"Secret", "ConfigMap", "DeleteOptions"})


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded Kubernetes object as its JSON dict."""
    if not body.startswith(MAGIC):
        raise ProtobufUnsupported("not a Kubernetes protobuf body (no k8s\\0 prefix)")
    envelope = _message(body[len(MAGIC) :], "Unknown")
    type_meta = envelope.get("typeMeta") or {}
    kind = type_meta.get("kind", "")
    if kind not in DECODABLE_KINDS:
        raise ProtobufUnsupported(
            f"protobuf bodies of kind {kind or '?'!r} are not understood here "
            f"(only {', '.join(sorted(DECODABLE_KINDS))}); send JSON"
        )
    obj = _message(envelope.get("raw", b""), kind)
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind, **obj}


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ProtobufUnsupported(f"unsupported protobuf wire type {wire_type}")
        yield number, wire_type, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ProtobufUnsupported("truncated protobuf varint")
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return result, position
        shift += 7


def _message(data: bytes, schema_name: str) -> dict[str, Any]:
    schema = _SCHEMAS[schema_name]
    result: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number not in schema:
            continue  # fields this decoder does not map (managedFields, selfLink...)
        name, field_type = schema[number]
        repeated = field_type.endswith("[]")
        decoded = _value(value, field_type.removesuffix("[]"))
        if field_type.startswith("map:"):
            result.setdefault(name, {}).update(decoded)
        elif repeated:
            result.setdefault(name, []).append(decoded)
        else:
            result[name] = decoded
    return result


def _value(value: Any, field_type: str) -> Any:
    match field_type:
        case "string":
            return value.decode("utf-8")
        case "raw":
            return value
        case "bytes":
            return base64.b64encode(value).decode("ascii")  # as JSON carries []byte
        case "int":
            return value - (1 << 64) if value >= 1 << 63 else value
        case "bool":
            return bool(value)
        case "time":
            seconds = _message_ints(value).get(1, 0)
            return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        case "map:string" | "map:bytes":
            entry = {number: raw for number, _, raw in _fields(value)}
            key = entry.get(1, b"").decode("utf-8")
            raw = entry.get(2, b"")
            return {key: raw.decode("utf-8") if field_type == "map:string" else base64.b64encode(raw).decode("ascii")}
    return _message(value, field_type)


def _message_ints(data: bytes) -> dict[int, int]:
    return {number: value for number, wire_type, value in _fields(data) if wire_type == 0}
