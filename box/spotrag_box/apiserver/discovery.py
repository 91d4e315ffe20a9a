"""Discovery (/api, /apis, /apis/<group>[/<version>]), /version and OpenAPI documents of the API stand-in."""

import collections
import re
from typing import Any

import aiohttp.web

from spotrag_box.apiserver.errors import no_such_path
from spotrag_box.apiserver.registry import SERVED_SUBRESOURCES, Registry

DEFAULT_SERVER_VERSION = "v1.36.0"


class Discovery:
    def __init__(
        self, registry: Registry, *, server_version: str = DEFAULT_SERVER_VERSION, server_address: str = ""
    ) -> None:
        self.registry = registry
        self.server_version = server_version  # settable while serving: clients probe it
        self.server_address = server_address

    def document(self, path: str) -> dict[str, Any] | None:
        """The discovery document at ``path``, or None when the path is not a discovery path."""
        parts = path.strip("/").split("/")
        if path == "/version":
            return self._version_info()
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._group_document(group) for group in sorted(self._groups())],
            }
        if parts[0] == "apis" and len(parts) == 2:
            if parts[1] not in self._groups():
                raise no_such_path()
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group_document(parts[1])}
        if (parts[0] == "api" and len(parts) == 2) or (parts[0] == "apis" and len(parts) == 3):
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            return self._resource_list(group, version)
        return None

    def openapi(self, path: str, accept: str) -> aiohttp.web.Response:
        """OpenAPI documents that declare no schemas.

        With them, kubectl and helm validate client-side against nothing (they skip kinds
        the document lacks) instead of failing to download OpenAPI; custom resources are
        still validated here, by admission. kubectl asks /openapi/v2 for protobuf: an empty
        message is a valid, empty openapi_v2.Document.
        """
        if path == "/openapi/v3":
            return aiohttp.web.json_response({"paths": {}})
        if "protobuf" in accept:
            return aiohttp.web.Response(
                body=b"", content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
            )
        return aiohttp.web.json_response(
            {
                "swagger": "2.0",
                "info": {"title": "Kubernetes", "version": self.server_version},
                "paths": {},
                "definitions": {},
            }
        )

    def _version_info(self) -> dict[str, Any]:
        match = re.match(r"v(\d+)\.(\d+)", self.server_version)
        major, minor = (match[1], match[2]) if match else ("1", "36")
        return {
            "major": major,
            "minor": minor,
            "emulationMajor": major,
            "emulationMinor": minor,
            "gitVersion": self.server_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for resource, _ in self.registry:
            if resource.group:
                groups[resource.group].add(resource.version)
        return {group: sorted(versions, key=_version_priority, reverse=True) for group, versions in groups.items()}

    def _group_document(self, group: str) -> dict[str, Any]:
        versions = [{"groupVersion": f"{group}/{version}", "version": version} for version in self._groups()[group]]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for resource, info in sorted(self.registry, key=lambda item: item[0].plural):
            if (resource.group, resource.version) != (group, version):
                continue
            entries.append(
                {
                    "name": resource.plural,
                    "singularName": info.singular,
                    "kind": info.kind,
                    "namespaced": info.namespaced,
                    "verbs": sorted(info.verbs),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {}),
                }
            )
            for subresource in sorted(info.subresources & SERVED_SUBRESOURCES):
                entries.append(
                    {
                        "name": f"{resource.plural}/{subresource}",
                        "singularName": "",
                        "namespaced": info.namespaced,
                        **_subresource_discovery(subresource, info.kind),
                    }
                )
        if not entries:
            raise no_such_path()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, then by number (v2 > v1)."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (-1, 0, 0)
    stability = {"alpha": 0, "beta": 1, None: 2}[match[2]]
    return (stability, int(match[1]), int(match[3] or 0))


def _subresource_discovery(subresource: str, kind: str | None) -> dict[str, Any]:
    match subresource:
        case "scale":
            return {"kind": "Scale", "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]}
        case "eviction":
            return {"kind": "Eviction", "group": "policy", "version": "v1", "verbs": ["create"]}
        case "binding":
            return {"kind": "Binding", "verbs": ["create"]}
    return {"kind": kind, "verbs": ["get", "patch", "update"]}
