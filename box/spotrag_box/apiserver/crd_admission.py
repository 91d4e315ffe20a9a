"""Admission of custom resources against their CRD, the way kube-apiserver does it.

In order, as the API server does on create, update and patch:

1. prune fields the structural schema does not declare (unless
   ``x-kubernetes-preserve-unknown-fields``), and nulls of non-nullable fields;
2. apply ``default`` values top-down, so a defaulted object gets the defaults
   of its own properties too;
3. validate against the openAPIV3Schema (types, enum, minimum/maximum,
   lengths, pattern, required, items, properties...) with ``jsonschema``;
4. evaluate the ``x-kubernetes-validations`` CEL rules with ``cel-python``
   (``self``; ``oldSelf`` on updates, where rules that use it are transition
   rules and skipped on create; ``message`` / ``messageExpression``,
   ``fieldPath``, ``reason``).

Errors are worded and placed the way kube-apiserver words them, e.g.
``spec.scaling.maxReplicas: Invalid value: 0: spec.scaling.maxReplicas in body
should be greater than or equal to 1``, so tests and users read what a real
cluster would say. Usable on its own: ``validate_custom_resource(crd, obj)``.
"""

import copy
import dataclasses
import functools
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

_MISSING: Any = object()  # "no old value here": oldSelf is unavailable


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One cause of a 422 Invalid: the field and the message kube-apiserver gives."""

    field: str
    message: str  # e.g. 'Invalid value: 0: spec.x in body should be greater than or equal to 1'
    reason: str = "FieldValueInvalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclasses.dataclass(frozen=True)
class AdmissionResult:
    object: dict[str, Any]  # defaulted and pruned
    errors: list[FieldError]
    unknown_fields: list[str]  # pruned paths: warnings, or errors under fieldValidation=Strict


def validate_custom_resource(
    crd: Mapping[str, Any], obj: Mapping[str, Any], old: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[FieldError]]:
    """The defaulted and pruned object and the validation errors (empty when valid)."""
    result = admit_custom_resource(crd, obj, old)
    return result.object, result.errors


def admit_custom_resource(
    crd: Mapping[str, Any], obj: Mapping[str, Any], old: Mapping[str, Any] | None = None
) -> AdmissionResult:
    version, error = _version_of(crd, obj)
    if version is None:
        return AdmissionResult(copy.deepcopy(dict(obj)), [error] if error else [], [])
    schema = (version.get("schema") or {}).get("openAPIV3Schema")
    new = copy.deepcopy(dict(obj))
    if not schema:
        return AdmissionResult(new, [], [])
    unknown: list[str] = []
    new = _prune(new, schema, "", unknown, root=True)
    new = _default(new, schema)
    errors = list(_schema_errors(new, schema))
    errors += _cel_errors(new, old if old is not None else _MISSING, schema, "")
    return AdmissionResult(new, _deduplicated(errors), unknown)


def invalid_message(kind: str, group: str, name: str, errors: list[FieldError]) -> str:
    """The Status message of a 422, as kube-apiserver's errors.NewInvalid writes it."""
    qualified = f"{kind}.{group}" if group else kind
    causes = [str(error) for error in errors]
    listed = causes[0] if len(causes) == 1 else "[" + ", ".join(causes) + "]"
    return f'{qualified} "{name}" is invalid: {listed}'


def check_crd(crd: Mapping[str, Any]) -> list[FieldError]:
    """What the API server refuses in a CRD itself: names, versions, and CEL that does not compile."""
    errors: list[FieldError] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    for required in ("group", "scope"):
        if not spec.get(required):
            errors.append(FieldError(f"spec.{required}", "Required value"))
    for required in ("plural", "kind"):
        if not names.get(required):
            errors.append(FieldError(f"spec.names.{required}", "Required value"))
    expected_name = f"{names.get('plural')}.{spec.get('group')}"
    name = (crd.get("metadata") or {}).get("name")
    if names.get("plural") and spec.get("group") and name != expected_name:
        errors.append(
            FieldError("metadata.name", f'Invalid value: {json.dumps(name)}: must be spec.names.plural+"."+spec.group')
        )
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        errors.append(
            FieldError(
                "spec.versions", 'Invalid value: "array": must have exactly one version marked as storage version'
            )
        )
    for index, version in enumerate(versions):
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        for path, rule in _rules_in(schema, f"spec.versions[{index}].schema.openAPIV3Schema"):
            try:
                _compiled(rule["rule"])
            except celpy.CELParseError as e:
                errors.append(
                    FieldError(
                        f"{path}.x-kubernetes-validations",
                        f"Invalid value: {json.dumps(rule['rule'])}: compilation failed: {e}",
                    )
                )
    return errors


def _version_of(crd: Mapping[str, Any], obj: Mapping[str, Any]) -> tuple[dict[str, Any] | None, FieldError | None]:
    spec = crd.get("spec") or {}
    api_version = obj.get("apiVersion") or ""
    group, _, version_name = api_version.rpartition("/")
    served = [v for v in spec.get("versions") or [] if v.get("served", True)]
    for version in served:
        if group == spec.get("group") and version_name == version.get("name"):
            return version, None
    supported = ", ".join(f'"{spec.get("group")}/{v.get("name")}"' for v in served)
    return None, FieldError(
        "apiVersion",
        f"Unsupported value: {json.dumps(api_version)}: supported values: {supported}",
        "FieldValueNotSupported",
    )


# --- pruning and defaulting ---------------------------------------------------------------------


def _prune(value: Any, schema: Mapping[str, Any], path: str, unknown: list[str], *, root: bool = False) -> Any:
    if isinstance(value, dict):
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        kept_anyway = (
            {"apiVersion", "kind", "metadata"} if root or schema.get("x-kubernetes-embedded-resource") else set()
        )
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        result: dict[str, Any] = {}
        for key, item in value.items():
            child_path = f"{path}.{key}" if path else key
            if key in kept_anyway:
                result[key] = item  # object metadata is the server's business, never the schema's
            elif properties is not None and key in properties:
                child_schema = properties[key]
                if item is None and not child_schema.get("nullable", False):
                    continue  # nulls of non-nullable fields are dropped before defaulting
                result[key] = _prune(item, child_schema, child_path, unknown)
            elif isinstance(additional, Mapping):
                result[key] = _prune(item, additional, child_path, unknown)
            elif preserve or additional is True:
                result[key] = item
            else:
                unknown.append(child_path)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_prune(item, schema["items"], f"{path}[{index}]", unknown) for index, item in enumerate(value)]
    return value


def _default(value: Any, schema: Mapping[str, Any]) -> Any:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, child_schema in properties.items():
            if key not in value and "default" in child_schema:
                value[key] = copy.deepcopy(child_schema["default"])
            if key in value:
                value[key] = _default(value[key], child_schema)
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key in value:
                if key not in properties:
                    value[key] = _default(value[key], additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_default(item, schema["items"]) for item in value]
    return value


# --- schema validation --------------------------------------------------------------------------


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes flavour) to JSON Schema draft 4, which jsonschema validates."""
    if not isinstance(schema, Mapping):
        return schema
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            result[key] = {name: _to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            result[key] = _to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            result[key] = [_to_jsonschema(sub) for sub in value]
        elif key in ("default", "format", "nullable", "example", "externalDocs") or key.startswith("x-kubernetes-"):
            continue
        else:
            result[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in result:
        types = result["type"] if isinstance(result["type"], list) else [result["type"]]
        result["type"] = types + ["null"]
        if "enum" in result:
            result["enum"] = list(result["enum"]) + [None]
    return result


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_to_jsonschema(json.loads(schema_json)))


def _schema_errors(obj: Any, schema: Mapping[str, Any]) -> Iterator[FieldError]:
    validator = _validator(json.dumps(schema, sort_keys=True))
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        yield from _as_field_errors(error)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _shown(value: Any) -> str:
    """A value as Go's field errors print it: strings quoted, containers by their type."""
    if isinstance(value, (dict, list)):
        return json.dumps(_json_type(value))
    return json.dumps(value)


def _path_of(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _as_field_errors(error: jsonschema.ValidationError) -> Iterator[FieldError]:
    field = _path_of(error.absolute_path)
    value, expected = error.instance, error.validator_value
    in_body = f"{field} in body"
    match error.validator:
        case "required":
            for name in expected:
                if isinstance(value, Mapping) and name not in value:
                    yield FieldError(f"{field}.{name}" if field else name, "Required value", "FieldValueRequired")
        case "type":
            wanted = ",".join(t for t in (expected if isinstance(expected, list) else [expected]) if t != "null")
            actual = json.dumps(_json_type(value))
            yield FieldError(field, f"Invalid value: {actual}: {in_body} must be of type {wanted}: {actual}")
        case "enum":
            supported = ", ".join(json.dumps(v) for v in expected if v is not None)
            yield FieldError(
                field, f"Unsupported value: {_shown(value)}: supported values: {supported}", "FieldValueNotSupported"
            )
        case "minimum":
            relation = "greater than" if error.schema.get("exclusiveMinimum") else "greater than or equal to"
            yield FieldError(field, f"Invalid value: {_shown(value)}: {in_body} should be {relation} {expected}")
        case "maximum":
            relation = "less than" if error.schema.get("exclusiveMaximum") else "less than or equal to"
            yield FieldError(field, f"Invalid value: {_shown(value)}: {in_body} should be {relation} {expected}")
        case "multipleOf":
            yield FieldError(field, f"Invalid value: {_shown(value)}: {in_body} should be a multiple of {expected}")
        case "minLength":
            yield FieldError(
                field, f"Invalid value: {_shown(value)}: {in_body} should be at least {expected} chars long"
            )
        case "maxLength":
            yield FieldError(field, f"Too long: may not be more than {expected} bytes", "FieldValueTooLong")
        case "pattern":
            yield FieldError(field, f"Invalid value: {_shown(value)}: {in_body} should match '{expected}'")
        case "minItems":
            yield FieldError(field, f"Invalid value: {len(value)}: {in_body} should have at least {expected} items")
        case "maxItems":
            yield FieldError(field, f"Too many: {len(value)}: must have at most {expected} items", "FieldValueTooMany")
        case "uniqueItems":
            yield FieldError(field, f"Duplicate value: {_shown(_first_duplicate(value))}", "FieldValueDuplicate")
        case "minProperties":
            yield FieldError(
                field, f"Invalid value: {len(value)}: {in_body} should have at least {expected} properties"
            )
        case "maxProperties":
            yield FieldError(field, f"Too many: {len(value)}: must have at most {expected} items", "FieldValueTooMany")
        case _:
            yield FieldError(field, f"Invalid value: {_shown(value)}: {in_body} {error.message}")


def _first_duplicate(items: list[Any]) -> Any:
    seen: list[Any] = []
    for item in items:
        if item in seen:
            return item
        seen.append(item)
    return None


def _deduplicated(errors: list[FieldError]) -> list[FieldError]:
    return list(dict.fromkeys(errors))


# --- CEL rules ----------------------------------------------------------------------------------


def _string_function(fn: Any) -> Any:
    return lambda *args: celtypes.StringType(fn(*[str(a) if isinstance(a, str) else a for a in args]))


# Part of Kubernetes' CEL string library (k8s.io/apiserver/pkg/cel/library) that cel-python lacks.
_KUBERNETES_FUNCTIONS = {
    "lowerAscii": _string_function(str.lower),
    "upperAscii": _string_function(str.upper),
    "trim": _string_function(str.strip),
    "replace": _string_function(lambda s, old, new: s.replace(old, new)),
    "join": lambda items, separator=celtypes.StringType(""): celtypes.StringType(str(separator).join(map(str, items))),
    "split": lambda s, separator: celtypes.ListType([celtypes.StringType(p) for p in str(s).split(str(separator))]),
    "indexOf": lambda s, sub: celtypes.IntType(str(s).find(str(sub))),
    "lastIndexOf": lambda s, sub: celtypes.IntType(str(s).rfind(str(sub))),
}
_CEL_ENVIRONMENT = celpy.Environment()


@functools.lru_cache(maxsize=512)
def _compiled(rule: str) -> celpy.Runner:
    return _CEL_ENVIRONMENT.program(_CEL_ENVIRONMENT.compile(rule), functions=_KUBERNETES_FUNCTIONS)


def _rules_in(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from _rules_in(sub, f"{path}.properties[{name}]")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            yield from _rules_in(schema[key], f"{path}.{key}")


def _cel_errors(value: Any, old: Any, schema: Mapping[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        error = _check_rule(rule, value, old, path)
        if error is not None:
            errors.append(error)
    if isinstance(value, Mapping):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            child_schema = properties.get(key) or (additional if isinstance(additional, Mapping) else None)
            if child_schema is None:
                continue
            child_old = old.get(key, _MISSING) if isinstance(old, Mapping) else _MISSING
            child_path = f"{path}.{key}" if path else key
            errors += _cel_errors(item, child_old, child_schema, child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        # List items have no oldSelf: only list-type=map items correlate, which we do not track.
        for index, item in enumerate(value):
            errors += _cel_errors(item, _MISSING, schema["items"], f"{path}[{index}]")
    return errors


def _check_rule(rule: Mapping[str, Any], value: Any, old: Any, path: str) -> FieldError | None:
    expression = rule["rule"]
    uses_old = re.search(r"\boldSelf\b", expression) is not None
    if uses_old and old is _MISSING:
        return None  # a transition rule: only checked when there is an old value
    field = path + rule["fieldPath"] if rule.get("fieldPath") else path
    activation = {"self": celpy.json_to_cel(value)}
    if uses_old:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _compiled(expression).evaluate(activation)
    except Exception as e:  # cel-python raises CELEvalError and friends for "no such key" and the like
        return FieldError(
            field, f"Invalid value: {json.dumps(_json_type(value))}: {_cel_error_text(e)} evaluating rule: {expression}"
        )
    if not isinstance(result, celtypes.BoolType):
        return FieldError(
            field, f"Invalid value: {json.dumps(_json_type(value))}: rule did not evaluate to a bool: {expression}"
        )
    if result:
        return None
    message = rule.get("message") or f"failed rule: {expression}"
    if rule.get("messageExpression"):
        try:
            message = str(_compiled(rule["messageExpression"]).evaluate(activation))
        except Exception:  # as the API server: a broken messageExpression falls back to the message
            pass
    reason = rule.get("reason", "FieldValueInvalid")
    shown = json.dumps(_json_type(value))
    worded = {
        "FieldValueForbidden": f"Forbidden: {message}",
        "FieldValueRequired": f"Required value: {message}",
        "FieldValueDuplicate": f"Duplicate value: {shown}: {message}",
    }.get(reason, f"Invalid value: {shown}: {message}")
    return FieldError(field, worded, reason)


def _cel_error_text(error: Exception) -> str:
    if error.args and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)
