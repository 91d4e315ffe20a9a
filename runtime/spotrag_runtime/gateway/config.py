"""The gateway's configuration: the JSON the operator renders into the
gateway's ConfigMap (key ``gateway.json``) and ``spotrag gateway --config``
reads.

Standard library only: the operator imports this module to render the
ConfigMap, and the operator's image carries no torch or FastAPI.

Keys are camelCase in JSON and snake_case here. ``GatewayConfig.from_mapping``
fills defaults, rejects unknown keys (suggesting the closest known one) and
wrong types, and names the offending key path in every error;
``GatewayConfig.to_mapping`` renders the JSON form back. See docs/gateway.md
for what each key does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "AdmissionConfig",
    "AuthConfig",
    "ConfigError",
    "EnginesConfig",
    "FailoverConfig",
    "GatewayConfig",
    "PromptConfig",
    "RetrievalConfig",
    "UIConfig",
    "load_config",
]

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant. Answer only from the numbered references you are given "
    "and cite them like [1]. If the references do not contain the answer, say that you don't know."
)
DEFAULT_TEMPLATE = "References:\n{contexts}\n\nQuestion: {question}"
TEMPLATE_PLACEHOLDERS = ("{contexts}", "{question}")


class ConfigError(ValueError):
    """The gateway configuration is invalid; the message names the key."""


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _key(name: str, *, check=None) -> dict[str, Any]:
    """Field metadata: the JSON key and an optional value check returning a problem or None."""
    return {"key": name, "check": check}


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    enabled: bool = field(default=True, metadata=_key("enabled"))
    embedding_model: str = field(default="sentence-transformers/all-MiniLM-L6-v2", metadata=_key("embeddingModel"))
    query_prefix: str = field(default="", metadata=_key("queryPrefix"))
    passage_prefix: str = field(default="", metadata=_key("passagePrefix"))
    index_path: str = field(default="/var/lib/spotrag/index", metadata=_key("indexPath"))
    top_k: int = field(default=4, metadata=_key("topK", check=_positive))
    score_threshold: float | None = field(default=0.0, metadata=_key("scoreThreshold"))
    device: str = field(default="auto", metadata=_key("device"))
    reload_interval_seconds: float = field(default=10.0, metadata=_key("reloadIntervalSeconds", check=_positive))
    # Questions waiting while the embedder is busy are embedded together, up to this many.
    max_batch_size: int = field(default=32, metadata=_key("maxBatchSize", check=_positive))
    # One torch thread per process was 20x faster than two on a loaded 2-core VM.
    torch_threads: int = field(default=1, metadata=_key("torchThreads", check=_positive))


def _check_template(template: str) -> str | None:
    missing = [p for p in TEMPLATE_PLACEHOLDERS if p not in template]
    return f"must contain {' and '.join(missing)}" if missing else None


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    system: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata=_key("system"))
    template: str = field(default=DEFAULT_TEMPLATE, metadata=_key("template", check=_check_template))
    context_token_budget: int = field(default=3000, metadata=_key("contextTokenBudget", check=_positive))


@dataclass(frozen=True, kw_only=True)
class EnginesConfig:
    discovery: Literal["static", "endpointslices"] = field(default="static", metadata=_key("discovery"))
    service: str | None = field(default=None, metadata=_key("service"))
    namespace: str | None = field(default=None, metadata=_key("namespace"))
    port: int = field(default=8000, metadata=_key("port", check=_positive))
    scheme: Literal["http", "https"] = field(default="http", metadata=_key("scheme"))
    urls: tuple[str, ...] = field(default=(), metadata=_key("urls"))


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    max_inflight_tokens_per_engine: int = field(
        default=65536, metadata=_key("maxInflightTokensPerEngine", check=_positive)
    )
    max_inflight_requests_per_engine: int = field(
        default=256, metadata=_key("maxInflightRequestsPerEngine", check=_positive)
    )
    max_queued_requests: int = field(default=1024, metadata=_key("maxQueuedRequests", check=_non_negative))
    queue_timeout_seconds: float = field(default=300.0, metadata=_key("queueTimeoutSeconds", check=_positive))
    # null: min(4096, maxModelLen / 2), so any context length leaves room for a prompt.
    max_tokens_limit: int | None = field(default=None, metadata=_key("maxTokensLimit", check=_positive))
    # null: min(512, the limit).
    default_max_tokens: int | None = field(default=None, metadata=_key("defaultMaxTokens", check=_positive))
    prefix_affinity: bool = field(default=True, metadata=_key("prefixAffinity"))
    max_body_bytes: int = field(default=1_048_576, metadata=_key("maxBodyBytes", check=_positive))
    # "auto": no round trip before the first token: an estimate calibrated by the prompt
    # tokens the engines report, corrected per request from the engine's first usage chunk;
    # the engine's /tokenize only when the estimate comes near the context limit.
    # "engine": exact counts from the engine's /tokenize for every request (one round trip);
    # "estimate": 4 bytes per token, never a round trip.
    token_counting: Literal["auto", "engine", "estimate"] = field(default="auto", metadata=_key("tokenCounting"))
    # Ready (and queuing) while no engine is known, e.g. while engines scale from zero.
    queue_without_engines: bool = field(default=False, metadata=_key("queueWithoutEngines"))
    # How long a request is held while no engine exists at all (scaled to zero: one is starting);
    # null: queueTimeoutSeconds. Its own knob, as a cold start (node, image, weights) takes minutes.
    cold_start_timeout_seconds: float | None = field(
        default=None, metadata=_key("coldStartTimeoutSeconds", check=_positive)
    )
    # A streamed request still waiting for its first token after this long gets its 200 and an
    # SSE comment (": waiting for an engine") every this many seconds, so proxies keep the
    # connection; a later error then comes inside the stream. 0: wait silently for the first token.
    keep_alive_seconds: float = field(default=5.0, metadata=_key("keepAliveSeconds", check=_non_negative))


@dataclass(frozen=True, kw_only=True)
class FailoverConfig:
    # Engine attempts in a row that may fail without producing a token.
    max_attempts: int = field(default=3, metadata=_key("maxAttempts", check=_positive))
    resume_streams: bool = field(default=True, metadata=_key("resumeStreams"))
    connect_timeout_seconds: float = field(default=2.0, metadata=_key("connectTimeoutSeconds", check=_positive))
    # Longest silence from an engine (before or between tokens) before the attempt counts as failed.
    read_timeout_seconds: float = field(default=60.0, metadata=_key("readTimeoutSeconds", check=_positive))
    # Once an answer streams, a silence longer than max(this, stallItlMultiplier x the stream's
    # inter-token latency p99) is a stall (vLLM whose shutdown timeout ran out): resume elsewhere.
    # 0 turns stall detection off (readTimeoutSeconds alone then applies).
    stall_timeout_seconds: float = field(default=2.0, metadata=_key("stallTimeoutSeconds", check=_non_negative))
    stall_itl_multiplier: float = field(default=10.0, metadata=_key("stallItlMultiplier", check=_positive))
    # The floor instead of stallTimeoutSeconds once the engine has left the serving set (draining):
    # a silence then is most likely its shutdown timeout running out, and moving on costs little.
    draining_stall_timeout_seconds: float = field(
        default=0.5, metadata=_key("drainingStallTimeoutSeconds", check=_positive)
    )
    # How long an engine that failed a request is passed over while others are available.
    engine_cooldown_seconds: float = field(default=5.0, metadata=_key("engineCooldownSeconds", check=_non_negative))


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    api_keys_dir: str | None = field(default=None, metadata=_key("apiKeysDir"))


# Paths the chat page may not take: the API and the probes live there.
RESERVED_PATHS = ("/v1", "/healthz", "/readyz", "/metrics")


def _check_ui_path(path: str) -> str | None:
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", path) or "//" in path:
        return "must be a URL path starting with /"
    if any(path.rstrip("/") == reserved or path.startswith(reserved + "/") for reserved in RESERVED_PATHS):
        return "must not be under " + ", ".join(RESERVED_PATHS)
    return None


@dataclass(frozen=True, kw_only=True)
class UIConfig:
    """The chat page the gateway serves (routes/ui.py)."""

    enabled: bool = field(default=True, metadata=_key("enabled"))
    path: str = field(default="/", metadata=_key("path", check=_check_ui_path))


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    served_model_name: str = field(metadata=_key("servedModelName"))
    deployment: str = field(default="spotrag", metadata=_key("deployment"))
    namespace: str = field(default="default", metadata=_key("namespace"))
    engine_model: str | None = field(default=None, metadata=_key("engineModel"))
    max_model_len: int = field(default=8192, metadata=_key("maxModelLen", check=_positive))
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig, metadata=_key("retrieval"))
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata=_key("prompt"))
    engines: EnginesConfig = field(default_factory=EnginesConfig, metadata=_key("engines"))
    admission: AdmissionConfig = field(default_factory=AdmissionConfig, metadata=_key("admission"))
    failover: FailoverConfig = field(default_factory=FailoverConfig, metadata=_key("failover"))
    auth: AuthConfig = field(default_factory=AuthConfig, metadata=_key("auth"))
    ui: UIConfig = field(default_factory=UIConfig, metadata=_key("ui"))

    @property
    def max_tokens_limit(self) -> int:
        """The highest max_tokens a client may ask for."""
        return self.admission.max_tokens_limit or max(1, min(4096, self.max_model_len // 2))

    @property
    def default_max_tokens(self) -> int:
        """max_tokens for a request that gives none (lowered further to fit the context)."""
        return self.admission.default_max_tokens or min(512, self.max_tokens_limit)

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("servedModelName: must not be empty")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"admission.defaultMaxTokens ({self.default_max_tokens}) is above "
                f"admission.maxTokensLimit ({self.max_tokens_limit})"
            )
        if self.max_tokens_limit >= self.max_model_len:
            raise ConfigError(
                f"admission.maxTokensLimit ({self.max_tokens_limit}) leaves no room for a prompt "
                f"in maxModelLen ({self.max_model_len})"
            )
        engines = self.engines
        if engines.discovery == "endpointslices" and not engines.service:
            raise ConfigError("engines.service: required when engines.discovery is 'endpointslices'")
        for url in engines.urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(f"engines.urls: {url!r} is not an http(s) URL")

    @classmethod
    def from_mapping(cls, mapping: Any) -> GatewayConfig:
        """Build from the ConfigMap's JSON form (camelCase keys), with defaults."""
        return _from_mapping(cls, mapping, "")

    @classmethod
    def from_json(cls, text: str, *, source: str = "gateway config") -> GatewayConfig:
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: not valid JSON: {error}") from None
        return cls.from_mapping(mapping)

    def to_mapping(self) -> dict[str, Any]:
        """The JSON form (camelCase keys), as the operator renders it."""
        return _to_mapping(self)

    def replace(self, **changes: Any) -> GatewayConfig:
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path) -> GatewayConfig:
    """Read the gateway config file (the mounted ConfigMap key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read gateway config {path}: {error.strerror or error}") from None
    return GatewayConfig.from_json(text, source=str(path))


# --- the generic mapping <-> dataclass conversion -----------------------------


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(kind))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _convert(kind: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(kind):
        return _from_mapping(kind, value, path + ".")
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{path}: must be {_type_name(kind)}, not {value!r}")
        return value
    if origin is tuple:
        (item_kind, _) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, not {type(value).__name__}")
        return tuple(_convert(item_kind, item, f"{path}[{i}]") for i, item in enumerate(value))
    # bool is an int in Python; a config that says `"topK": true` is a mistake.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: must be {_type_name(kind)}, not {json.dumps(value)}")


def _from_mapping(cls: type, mapping: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "gateway config"
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: must be an object, not {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    values: dict[str, Any] = {}
    for key, spec in fields.items():
        path = prefix + key
        if key not in mapping:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required")
            continue
        value = _convert(hints[spec.name], mapping[key], path)
        check = spec.metadata["check"]
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"{path}: {problem}, not {json.dumps(value)}")
        values[spec.name] = value
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}" if prefix else str(error)) from None


def _to_mapping(instance: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in dataclasses.fields(instance):
        value = getattr(instance, spec.name)
        if dataclasses.is_dataclass(value):
            value = _to_mapping(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[spec.metadata["key"]] = value
    return out
