"""The one error type of every Kubernetes call spotrag makes."""

from __future__ import annotations

import json

VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class KubeError(Exception):
    """An error answer from the Kubernetes API, with its status and reason."""

    def __init__(
        self, status: int, reason: str, message: str, body: dict | None = None, *, method: str = "", path: str = ""
    ):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        self.method = method
        self.path = path

    @classmethod
    def from_answer(cls, status: int, content: bytes, *, method: str = "", path: str = "") -> KubeError:
        """From an error answer's body (a Status object, or anything else a proxy sends)."""
        try:
            payload = json.loads(content) if content else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        message = payload.get("message") or content.decode(errors="replace")[:500]
        return cls(status, payload.get("reason", ""), message, payload, method=method, path=path)

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        """410: a watch's resourceVersion is too old; list again."""
        return self.status == 410

    def request(self) -> str:
        """The request in RBAC's words, e.g. "create pods in namespace default"."""
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        group = "" if parts[:1] == ["api"] else parts[1] if len(parts) > 1 else ""
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        resource = rest[0] if rest else "?"
        if len(rest) > 2:
            resource += f"/{rest[2]}"  # a subresource, e.g. ragdeployments/status
        verb = VERBS.get(self.method, self.method.lower())
        if verb == "get" and len(rest) == 1:
            verb = "list"
        where = f" in namespace {namespace}" if namespace else ""
        return f"{verb} {resource}{f' ({group})' if group else ''}{where}"
