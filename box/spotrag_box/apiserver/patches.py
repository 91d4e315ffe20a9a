"""The four PATCH content types of the Kubernetes API, applied to plain dicts.

- JSON merge patch (RFC 7386): ``application/merge-patch+json``.
- JSON patch (RFC 6902, via the ``jsonpatch`` library): ``application/json-patch+json``.
- Strategic merge patch: ``application/strategic-merge-patch+json``. Lists of
  the built-in kinds that Kubernetes merges by a key (containers by name, env by
  name, ports by port...) are merged by that key, and kubectl's ``$patch``,
  ``$retainKeys``, ``$setElementOrder`` and ``$deleteFromPrimitiveList``
  directives are honoured or dropped, so ``kubectl apply`` of a Deployment does
  not lose containers. Only the common merge keys are known (see MERGE_KEYS).
- Server-side apply: ``application/apply-patch+yaml`` is applied as a strategic
  merge without field ownership (no managedFields, no conflicts).
"""

import copy
from collections.abc import Mapping
from typing import Any

import jsonpatch
import jsonpointer

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE_PATCH, JSON_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)

# patchMergeKey of list fields in the built-in types (k8s.io/api, `patchStrategy:"merge"`).
# Several keys for one field name: the first key that the list items carry wins
# (container ports merge by containerPort, service ports by port).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "ports": ("containerPort", "port"),
    "ownerReferences": ("uid",),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey",),
    "resourceClaims": ("name",),
    "taints": ("key",),
}
# Lists of scalars that merge as sets (`patchStrategy:"merge"` on []string).
MERGED_SCALAR_LISTS = frozenset({"finalizers"})


class PatchError(Exception):
    """A patch that cannot be applied: the server answers 422 (or 400 when malformed)."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Mapping[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 with the server's answers: a malformed patch is 400, a failed one 422."""
    if not isinstance(operations, list):
        raise PatchError("json patch must be a list of operations", status=400)
    try:
        patch = jsonpatch.JsonPatch(operations)
        return patch.apply(copy.deepcopy(dict(target)))
    except jsonpatch.JsonPatchTestFailed as e:
        raise PatchError(f"the server rejected our request due to an error in our request: {e}") from e
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException, TypeError) as e:
        raise PatchError(f"invalid json patch: {e}", status=400) from e
    except jsonpatch.JsonPatchException as e:
        raise PatchError(f"the json patch could not be applied: {e}") from e


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch of a built-in object, for the common merge keys."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder/… and $retainKeys: handled below or ordering only
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(patch.get("$retainKeys"), list):
        retained = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in retained}
    return result


def _merge_list(field: str, current: Any, patch: list[Any]) -> list[Any]:
    current_list = list(current) if isinstance(current, list) else []
    if field in MERGED_SCALAR_LISTS and all(not isinstance(item, (dict, list)) for item in patch):
        return current_list + [item for item in patch if item not in current_list]
    merge_key = _merge_key_of(field, patch, current_list)
    if merge_key is None:
        return [strategic_merge_patch(None, item) for item in patch]  # atomic list: replaced
    merged = list(current_list)
    for item in patch:
        position = next(
            (
                i
                for i, existing in enumerate(merged)
                if isinstance(existing, Mapping) and existing.get(merge_key) == item.get(merge_key)
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del merged[position]
        elif position is None:
            merged.append(strategic_merge_patch(None, item))
        else:
            merged[position] = strategic_merge_patch(merged[position], item)
    return merged


def _merge_key_of(field: str, patch: list[Any], current: list[Any]) -> str | None:
    items = [item for item in patch + current if isinstance(item, Mapping)]
    if not items or len(items) != len(patch) + len(current):
        return None
    for key in MERGE_KEYS.get(field, ()):
        if all(key in item for item in items):
            return key
    return None


def apply_patch(content_type: str, target: Mapping[str, Any], patch: Any, *, strategic: bool) -> dict[str, Any]:
    """Apply a patch of a content type; ``strategic`` says whether merge keys apply (built-ins)."""
    if content_type == JSON_PATCH:
        return json_patch(target, patch)
    if not isinstance(patch, Mapping):
        raise PatchError("the patch must be a JSON object", status=400)
    if content_type == MERGE_PATCH:
        return merge_patch(target, patch)
    if content_type in (STRATEGIC_MERGE_PATCH, APPLY_PATCH) and strategic:
        return strategic_merge_patch(target, patch)
    if content_type == APPLY_PATCH:
        return merge_patch(target, patch)
    raise PatchError(f"unsupported patch type {content_type!r}", status=415)
