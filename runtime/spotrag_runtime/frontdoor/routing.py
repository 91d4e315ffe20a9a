"""Which RAGDeployment answers a model name: pure functions from what the API
holds (RAGDeployments and ModelRoutes, as dicts) to a ``RouteTable``.

- Every RAGDeployment is served under its ``spec.model.servedModelName``
  (default: its name).
- A ``ModelRoute`` serves ``spec.model`` (default: its name) from the
  RAGDeployments of its namespace listed in ``spec.backends`` with relative
  weights (as Gateway API's ``backendRefs``: shares are weight / sum). A
  route's model name wins over a RAGDeployment's served name.
- Conflicts (two routes, or two RAGDeployments, for one name) are settled by
  age, then namespace/name, and reported; so are backends that do not exist
  and weights that are all zero. Nothing here raises on bad input.

Picking a variant: weighted at random, or, when the request names its user
(the route's sticky header), by a hash of that name that every front door
replica computes alike, so a user stays on one variant until the weights
change.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spotrag_runtime.moderation import ConfigError, ModerationConfig

GROUP, VERSION = "spotrag.io", "v1alpha1"


@dataclass(frozen=True)
class Backend:
    """One RAGDeployment's gateway."""

    namespace: str
    name: str
    served_model: str
    moderation: ModerationConfig | None = None
    ready: bool = True  # its Ready condition (reported; traffic is not held back on it)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Variant:
    backend: Backend
    weight: int


@dataclass(frozen=True)
class Route:
    model: str
    variants: tuple[Variant, ...]
    source: str  # "ModelRoute ns/name" or "RAGDeployment ns/name"
    sticky_header: str | None = None
    problems: tuple[str, ...] = ()
    _total: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_total", sum(v.weight for v in self.variants if v.weight > 0))

    def shares(self) -> dict[str, float]:
        return {v.backend.key: (v.weight / self._total if self._total else 0.0) for v in self.variants}

    def pick(
        self,
        sticky_key: str | None = None,
        rng: random.Random | None = None,
        usable: Callable[[Backend], bool] | None = None,
    ) -> Variant | None:
        """A variant by weight; None when no variant may take traffic.
        ``usable`` leaves out backends with nowhere to send to (no ready endpoint)."""
        candidates = [v for v in self.variants if v.weight > 0 and (usable is None or usable(v.backend))]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        total = sum(v.weight for v in candidates)
        if sticky_key:
            digest = hashlib.blake2b(f"{self.model}\0{sticky_key}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") % total
        else:
            point = (rng or random).randrange(total)
        for variant in candidates:
            point -= variant.weight
            if point < 0:
                return variant
        return candidates[-1]  # unreachable: the points cover [0, total)


@dataclass
class RouteTable:
    routes: dict[str, Route] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)  # by "namespace/name"
    problems: list[str] = field(default_factory=list)
    # Status for each ModelRoute, by (namespace, name), as it should be written.
    route_status: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted(self.routes)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _age_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = _meta(obj)
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or "")


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    condition = {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def backend_of(ragd: Mapping[str, Any]) -> tuple[Backend, str | None]:
    """The Backend of a RAGDeployment, and a problem with it (or None)."""
    meta, spec = _meta(ragd), ragd.get("spec") or {}
    name, namespace = meta.get("name") or "", meta.get("namespace") or "default"
    served = (spec.get("model") or {}).get("servedModelName") or name
    conditions = {c.get("type"): c for c in (ragd.get("status") or {}).get("conditions") or ()}
    ready = (conditions.get("Ready") or {}).get("status", "True") == "True"
    problem = None
    try:
        moderation = ModerationConfig.from_mapping(spec.get("moderation"))
    except (ConfigError, TypeError, ValueError) as error:
        # Fail closed: a deployment whose moderation cannot be read is not served unmoderated.
        moderation, problem = None, f"RAGDeployment {namespace}/{name}: spec.moderation: {error}"
    return Backend(namespace, name, served, moderation, ready), problem


def build_table(
    ragdeployments: Iterable[Mapping[str, Any]],
    model_routes: Iterable[Mapping[str, Any]] = (),
    *,
    default_sticky_header: str | None = None,
) -> RouteTable:
    table = RouteTable()
    broken: set[str] = set()
    for ragd in sorted(ragdeployments, key=_age_key):
        if not _meta(ragd).get("name"):
            continue
        backend, problem = backend_of(ragd)
        table.backends[backend.key] = backend
        if problem:
            table.problems.append(problem)
            broken.add(backend.key)

    # ModelRoutes first: their names win.
    for route_obj in sorted(model_routes, key=_age_key):
        route, status = _route_of(route_obj, table, broken, default_sticky_header)
        meta = _meta(route_obj)
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        table.route_status[key] = status
        if route is None:
            continue
        if route.model in table.routes:
            problem = f"model {route.model!r} is already served by {table.routes[route.model].source}"
            table.problems.append(f"{route.source}: {problem}")
            status["conditions"][0] = _condition(
                "Accepted", False, "Conflict", problem, _meta(route_obj).get("generation")
            )
            continue
        table.routes[route.model] = route

    for backend in table.backends.values():
        if backend.key in broken:
            continue
        source = f"RAGDeployment {backend.key}"
        existing = table.routes.get(backend.served_model)
        if existing is not None:
            if existing.source.startswith("RAGDeployment"):
                table.problems.append(
                    f"{source}: model {backend.served_model!r} is already served by {existing.source}"
                )
            continue  # a ModelRoute of that name wins silently: that is what routes are for
        table.routes[backend.served_model] = Route(
            backend.served_model, (Variant(backend, 1),), source, default_sticky_header
        )
    return table


def _route_of(
    obj: Mapping[str, Any], table: RouteTable, broken: set[str], default_sticky_header: str | None
) -> tuple[Route | None, dict[str, Any]]:
    meta, spec = _meta(obj), obj.get("spec") or {}
    namespace, name, generation = meta.get("namespace") or "default", meta.get("name") or "", meta.get("generation")
    model = spec.get("model") or name
    source = f"ModelRoute {namespace}/{name}"
    variants, missing, rows = [], [], []
    for ref in spec.get("backends") or ():
        target = str(ref.get("ragDeployment") or "")
        try:
            weight = max(0, int(ref.get("weight", 1)))
        except (TypeError, ValueError):
            weight = 0
        backend = table.backends.get(f"{namespace}/{target}")
        usable = backend is not None and backend.key not in broken
        rows.append({"ragDeployment": target, "weight": weight, "found": backend is not None})
        if usable:
            variants.append(Variant(backend, weight))
        else:
            missing.append(target)
    route = Route(model, tuple(variants), source, spec.get("stickyHeader") or default_sticky_header)
    shares = route.shares()
    for row in rows:
        share = shares.get(f"{namespace}/{row['ragDeployment']}", 0.0) if row["found"] else 0.0
        row["share"] = f"{share * 100:.4g}%"
        backend = table.backends.get(f"{namespace}/{row['ragDeployment']}")
        row["ready"] = bool(backend and backend.ready)
    total = sum(v.weight for v in variants)
    problems = []
    if missing:
        problems.append(f"no RAGDeployment {', '.join(sorted(set(missing)))} in {namespace} (or its spec is invalid)")
    declared = sum(row["weight"] for row in rows)
    if not spec.get("backends"):
        accepted = _condition("Accepted", False, "NoBackends", "spec.backends is empty", generation)
    elif total == 0:
        accepted = _condition(
            "Accepted", False, "NoWeight", "no existing backend has a weight above 0: requests get 503", generation
        )
    else:
        note = "" if declared == 100 else f" (weights sum to {declared}; shares are weight / {total})"
        accepted = _condition("Accepted", True, "Accepted", f"serving {model!r}{note}", generation)
    resolved = _condition(
        "ResolvedRefs",
        not missing,
        "BackendNotFound" if missing else "ResolvedRefs",
        "; ".join(problems) or "every backend exists",
        generation,
    )
    status = {
        "observedGeneration": generation,
        "model": model,
        "backends": ", ".join(f"{row['ragDeployment']}={row['share']}" for row in rows),
        "variants": rows,
        "conditions": [accepted, resolved],
    }
    route = Route(model, tuple(variants), source, route.sticky_header, tuple(problems))
    if accepted["status"] != "True" and not spec.get("backends"):
        table.problems.append(f"{source}: spec.backends is empty")
        return None, status
    table.problems.extend(f"{source}: {p}" for p in problems)
    if total == 0:
        table.problems.append(f"{source}: no backend with a weight above 0")
    return route, status
