"""The one error type of the API stand-in: an answer other than success, as a meta/v1 Status."""

from collections.abc import Mapping
from typing import Any

from spotrag_box.apiserver import crd_admission as admission
from spotrag_box.apiserver.registry import Served

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """An answer of the API server other than success, rendered as a meta/v1 Status."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def no_such_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def not_found(served: Served, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{served.qualified} "{name}" not found',
        {"name": name, "group": served.group, "kind": served.plural},
    )


def conflict(served: Served, name: str, why: str | None = None) -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {served.qualified} "{name}": {why}',
        {"name": name, "group": served.group, "kind": served.plural},
    )


def invalid(served: Served, name: str, errors: list[admission.FieldError]) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        admission.invalid_message(served.kind, served.group, name, errors),
        {
            "name": name,
            "group": served.group,
            "kind": served.kind,
            "causes": [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors],
        },
    )
