"""The front door's configuration: the file the chart mounts (JSON or YAML,
camelCase keys), or built in code for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STICKY_HEADER = "X-Spotrag-User"
ADDRESS_MODES = ("service", "endpointslices")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class StaticBackend:
    """A backend given by URL instead of discovered (no Kubernetes API)."""

    model: str
    ragdeployment: str  # "namespace/name" or "name"
    url: str
    weight: int = 1
    served_model_name: str | None = None
    moderation: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class FrontDoorConfig:
    # Which RAGDeployments and ModelRoutes are served: these namespaces (empty: all)
    # and, optionally, only those matching a label selector.
    namespaces: tuple[str, ...] = ()
    selector: str = ""
    # How a gateway is reached: its Service's DNS name ("service"), or the ready
    # endpoints of its Service's EndpointSlices ("endpointslices": spreads
    # connections over gateway pods; also what works outside a cluster).
    address: str = "service"
    cluster_domain: str = "svc"
    gateway_port: int = 80
    sticky_header: str = DEFAULT_STICKY_HEADER
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 600.0
    # API keys: a folder of key files (one per key, the file name is the key's
    # name) and, per key name, the models it may use (absent: all).
    api_keys_dir: str | None = None
    models_by_key: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    write_status: bool = True
    static: tuple[StaticBackend, ...] = ()

    def __post_init__(self) -> None:
        if self.address not in ADDRESS_MODES:
            raise ConfigError(f"address must be one of {', '.join(ADDRESS_MODES)}, not {self.address!r}")
        if self.max_body_bytes < 1024:
            raise ConfigError("maxBodyBytes must be at least 1024")

    @property
    def uses_kubernetes(self) -> bool:
        return not self.static

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> FrontDoorConfig:
        keys = mapping.get("apiKeys") or {}
        static = tuple(
            StaticBackend(
                model=item["model"],
                ragdeployment=item.get("ragDeployment") or item["model"],
                url=item["url"],
                weight=int(item.get("weight", 1)),
                served_model_name=item.get("servedModelName"),
                moderation=item.get("moderation"),
            )
            for item in mapping.get("static") or ()
        )
        try:
            return cls(
                namespaces=tuple(mapping.get("namespaces") or ()),
                selector=str(mapping.get("selector") or ""),
                address=str(mapping.get("address", "service")),
                cluster_domain=str(mapping.get("clusterDomain", "svc")),
                gateway_port=int(mapping.get("gatewayPort", 80)),
                sticky_header=str(mapping.get("stickyHeader", DEFAULT_STICKY_HEADER)),
                max_body_bytes=int(mapping.get("maxBodyBytes", cls.max_body_bytes)),
                connect_timeout_seconds=float(mapping.get("connectTimeoutSeconds", 5.0)),
                read_timeout_seconds=float(mapping.get("readTimeoutSeconds", 600.0)),
                api_keys_dir=keys.get("directory"),
                models_by_key={name: tuple(models) for name, models in (keys.get("models") or {}).items()},
                write_status=bool(mapping.get("writeStatus", True)),
                static=static,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"invalid front door config: {error}") from None


def load_config(path: str | Path) -> FrontDoorConfig:
    try:
        mapping = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return FrontDoorConfig.from_mapping(mapping)
