"""Label and field selectors as the Kubernetes API server parses and applies them.

Label selectors follow k8s.io/apimachinery/pkg/labels: comma-separated
requirements ``key``, ``!key``, ``key=v``, ``key==v``, ``key!=v``,
``key in (a,b)``, ``key notin (a,b)``, ``key>3``, ``key<3``.

Field selectors are ``path=v``, ``path==v``, ``path!=v``; a server only accepts
the fields it indexes for the resource, so unknown fields are rejected as a real
one does, which catches typos that would otherwise match nothing.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any


class SelectorError(ValueError):
    """A selector that the API server would answer with 400 Bad Request."""


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # '=', '!=', 'in', 'notin', 'exists', '!exists', 'gt', 'lt'
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case "gt" | "lt":
                try:
                    number = int(value) if value is not None else None
                except ValueError:
                    return False
                if number is None:
                    return False
                limit = int(self.values[0])
                return number > limit if self.operator == "gt" else number < limit
        raise AssertionError(f"unknown operator {self.operator!r}")


# One requirement at a time, anchored at the current position of the scanner.
_SET_REQUIREMENT = re.compile(r"\s*(?P<key>[^\s,!=<>()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*")
_EQUALITY_REQUIREMENT = re.compile(r"\s*(?P<key>[^\s,!=<>()]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^\s,()]*)\s*")
_EXISTS_REQUIREMENT = re.compile(r"\s*(?P<neg>!?)\s*(?P<key>[^\s,!=<>()]+)\s*")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a label selector string; an empty one selects everything."""
    if not text or not text.strip():
        return ()
    requirements: list[Requirement] = []
    position = 0
    while position < len(text):
        requirement, position = _parse_one_requirement(text, position)
        _check_label_key(requirement.key, text)
        requirements.append(requirement)
        if position < len(text):
            if text[position] != ",":
                raise SelectorError(f"unable to parse requirement: found {text[position:]!r} in {text!r}")
            position += 1
            if position == len(text):
                raise SelectorError(f"found trailing ',' in label selector {text!r}")
    return tuple(requirements)


def _parse_one_requirement(text: str, position: int) -> tuple[Requirement, int]:
    if match := _SET_REQUIREMENT.match(text, position):
        values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
        if not values:
            raise SelectorError(f"for 'in', 'notin' operators, values set can't be empty: {text!r}")
        for value in values:
            _check_label_value(value, text)
        return Requirement(match["key"], match["op"], values), match.end()
    if match := _EQUALITY_REQUIREMENT.match(text, position):
        op = {"==": "=", "=": "=", "!=": "!=", ">": "gt", "<": "lt"}[match["op"]]
        value = match["value"]
        if op in ("gt", "lt") and not re.fullmatch(r"-?\d+", value):
            raise SelectorError(f"for 'Gt', 'Lt' operators, the value must be an integer: {text!r}")
        _check_label_value(value, text)
        return Requirement(match["key"], op, (value,)), match.end()
    if match := _EXISTS_REQUIREMENT.match(text, position):
        return Requirement(match["key"], "!exists" if match["neg"] else "exists"), match.end()
    raise SelectorError(f"unable to parse requirement in label selector {text!r}")


def _check_label_key(key: str, text: str) -> None:
    if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"invalid label key {key!r} in label selector {text!r}")


def _check_label_value(value: str, text: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise SelectorError(f"invalid label value {value!r} in label selector {text!r}")


def labels_match(requirements: tuple[Requirement, ...], obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(requirement.matches(labels) for requirement in requirements)


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    path: str
    negated: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        actual = field_value(obj, self.path)
        return (actual != self.value) if self.negated else (actual == self.value)


# The fields each kind indexes (pkg/registry/*/strategy.go, "ToSelectableFields").
# metadata.name and metadata.namespace are always selectable.
SELECTABLE_FIELDS: dict[str, frozenset[str]] = {
    "Pod": frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    "Node": frozenset({"spec.unschedulable"}),
    "Namespace": frozenset({"status.phase"}),
    "Secret": frozenset({"type"}),
    "Event": frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "deprecatedSource",
        }
    ),
    "Job": frozenset({"status.successful"}),
    "ReplicaSet": frozenset({"status.replicas"}),
    "CertificateSigningRequest": frozenset({"spec.signerName"}),
}
_ALWAYS_SELECTABLE = frozenset({"metadata.name", "metadata.namespace"})


def parse_field_selector(
    text: str | None, *, kind: str, extra_fields: frozenset[str] = frozenset()
) -> tuple[FieldRequirement, ...]:
    """Parse a field selector, refusing fields the kind does not index."""
    if not text or not text.strip():
        return ()
    allowed = _ALWAYS_SELECTABLE | SELECTABLE_FIELDS.get(kind, frozenset()) | extra_fields
    requirements: list[FieldRequirement] = []
    for term in text.split(","):
        match = re.fullmatch(r"\s*([^!=\s]+)\s*(==|=|!=)\s*(.*?)\s*", term)
        if not match:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {term!r}")
        path, op, value = match.groups()
        if path not in allowed:
            raise SelectorError(f"field label not supported: {path}")
        requirements.append(FieldRequirement(path, op == "!=", value))
    return tuple(requirements)


def fields_match(requirements: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    return all(requirement.matches(obj) for requirement in requirements)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string a field selector compares: absent fields read as '' (as in the real indexers)."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_label_selector(selector: Mapping[str, Any]) -> str:
    """Render a metav1.LabelSelector (matchLabels + matchExpressions) as selector text."""
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    spellings: dict[str, Callable[[str, list[str]], str]] = {
        "In": lambda key, values: f"{key} in ({','.join(values)})",
        "NotIn": lambda key, values: f"{key} notin ({','.join(values)})",
        "Exists": lambda key, values: key,
        "DoesNotExist": lambda key, values: f"!{key}",
    }
    for expression in selector.get("matchExpressions") or []:
        spell = spellings[expression["operator"]]
        parts.append(spell(expression["key"], sorted(expression.get("values") or [])))
    return ",".join(parts)
