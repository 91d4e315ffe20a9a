"""Moderation of what goes into a model and what comes out: built-in rules
(block lists, regular expressions, PII redaction) and an external checker
that speaks OpenAI's moderation API (``POST /v1/moderations``).

Usable by any part that holds a request: the front door applies it today
(the question before routing, the answer in windows while it streams); the
gateway can apply the same ``Moderator``. Configuration is the
RAGDeployment's ``spec.moderation`` (camelCase keys, see ``ModerationConfig
.from_mapping``).

A check returns a ``Verdict``; a blocked one becomes ``ContentBlocked`` (400,
code ``content_filter``, with the rule's reason) or, when the checker is
down and the policy is fail-closed, ``ModerationUnavailable`` (503).

Reason codes (``error.reason`` and the metrics' ``reason`` label):
  blocked_term        a block-list entry matched (whole words, any case)
  blocked_pattern     a regular expression matched
  flagged             the external checker flagged it (categories in the message)
  checker_unavailable the checker failed or timed out, and failure is "closed"
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from spotrag_runtime.gateway.errors import APIError, error_body

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 2.0
DEFAULT_WINDOW_CHARS = 200
# Text of the previous window sent with the next to the checker, so a phrase
# cut by a window boundary is still seen whole.
WINDOW_OVERLAP_CHARS = 64

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Phone-like: 7+ digits with the usual separators, optionally +country code.
PHONE = re.compile(r"(?<![\w+])\+?\d(?:[\s().-]?\d){6,14}(?!\w)")
REDACTIONS = ((EMAIL, "[email]"), (PHONE, "[phone]"))


class ConfigError(ValueError):
    """``spec.moderation`` is not valid (a bad regular expression, a bad value)."""


class ContentBlocked(APIError):
    status = 400
    type = "invalid_request_error"
    code = "content_filter"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def body(self) -> dict[str, Any]:
        body = error_body(self.message, type=self.type, code=self.code, param=self.param)
        body["error"]["reason"] = self.reason
        return body


class ModerationUnavailable(ContentBlocked):
    status = 503
    type = "service_unavailable"
    code = "moderation_unavailable"


@dataclass(frozen=True)
class CheckerConfig:
    url: str  # base URL; "/v1/moderations" is appended unless the URL already ends with it
    model: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    fail_open: bool = True
    categories: tuple[str, ...] = ()  # block only these; empty: whatever the checker flags
    api_key_env: str | None = None  # name of an environment variable holding the key

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/moderations") else f"{url}/v1/moderations"


@dataclass(frozen=True)
class ModerationConfig:
    input: bool = True
    output: bool = True
    block_list: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    redact_pii: bool = False
    window_chars: int = DEFAULT_WINDOW_CHARS
    checker: CheckerConfig | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        compiled = []
        if self.block_list:
            words = "|".join(re.escape(term) for term in sorted(self.block_list, key=len, reverse=True))
            compiled.append(re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE))
        for pattern in self.patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise ConfigError(f"moderation.patterns: {pattern!r} is not a regular expression: {error}") from None
        if self.window_chars < 1:
            raise ConfigError("moderation.windowChars must be at least 1")
        object.__setattr__(self, "_compiled", tuple(compiled))

    @property
    def active(self) -> bool:
        return bool(self.block_list or self.patterns or self.redact_pii or self.checker)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | None) -> ModerationConfig | None:
        """From ``spec.moderation``; None when absent or disabled."""
        if not spec or spec.get("enabled") is False:
            return None
        checker = spec.get("checker")
        checker_config = None
        if checker and checker.get("url"):
            checker_config = CheckerConfig(
                url=str(checker["url"]),
                model=checker.get("model"),
                timeout_seconds=float(checker.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)),
                fail_open=(checker.get("onError", "allow") == "allow"),
                categories=tuple(checker.get("categories") or ()),
                api_key_env=checker.get("apiKeyEnv"),
            )
        config = cls(
            input=bool(spec.get("input", True)),
            output=bool(spec.get("output", True)),
            block_list=tuple(str(term) for term in spec.get("blockList") or () if str(term).strip()),
            patterns=tuple(str(p) for p in spec.get("patterns") or ()),
            redact_pii=bool(spec.get("redactPII", False)),
            window_chars=int(spec.get("windowChars", DEFAULT_WINDOW_CHARS)),
            checker=checker_config,
        )
        return config if config.active else None


@dataclass(frozen=True)
class Verdict:
    blocked: bool = False
    reason: str | None = None
    detail: str = ""
    text: str | None = None  # the redacted text, when redaction changed it
    checker_failed: bool = False  # the checker did not answer (and the request went on: fail-open)

    def error(self, stage: str) -> ContentBlocked:
        what = "question" if stage == "input" else "answer"
        message = f"The {what} was blocked by moderation ({self.reason}{': ' + self.detail if self.detail else ''})."
        if self.reason == "checker_unavailable":
            return ModerationUnavailable(message, reason=self.reason)
        return ContentBlocked(message, reason=self.reason or "blocked")


ALLOWED = Verdict()


def redact(text: str) -> str:
    for pattern, replacement in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class Moderator:
    """Checks text against one ``ModerationConfig``. ``http`` is shared by the
    caller (one connection pool for every checker call)."""

    def __init__(self, config: ModerationConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self._http = http

    def check_rules(self, text: str) -> Verdict:
        for index, pattern in enumerate(self.config._compiled):
            if pattern.search(text):
                term_rule = bool(self.config.block_list) and index == 0
                return Verdict(blocked=True, reason="blocked_term" if term_rule else "blocked_pattern")
        return ALLOWED

    async def check_input(self, text: str) -> Verdict:
        """The question: rules, then PII redaction, then the checker (on the redacted text)."""
        verdict = self.check_rules(text)
        if verdict.blocked:
            return verdict
        redacted = redact(text) if self.config.redact_pii else text
        checked = await self.check_external(redacted)
        if checked.blocked or checked.checker_failed:
            return checked
        return Verdict(text=redacted) if redacted != text else ALLOWED

    async def check_output(self, answer: str, window: str) -> Verdict:
        """One window of an answer: the rules over the whole answer so far (a
        term split across windows is still one term), the checker over the
        window with a little of the one before."""
        verdict = self.check_rules(answer)
        if verdict.blocked:
            return verdict
        return await self.check_external(answer[-(len(window) + WINDOW_OVERLAP_CHARS) :])

    async def check_external(self, text: str) -> Verdict:
        checker = self.config.checker
        if checker is None or not text.strip():
            return ALLOWED
        body: dict[str, Any] = {"input": text}
        if checker.model:
            body["model"] = checker.model
        headers = {}
        if checker.api_key_env:
            if key := os.environ.get(checker.api_key_env):
                headers["Authorization"] = f"Bearer {key}"
        try:
            async with asyncio.timeout(checker.timeout_seconds):
                response = await self._http.post(checker.endpoint, json=body, headers=headers)
                response.raise_for_status()
                results = response.json()["results"]
        except (TimeoutError, httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            log.warning("moderation checker %s failed: %r", checker.endpoint, error)
            if checker.fail_open:
                return Verdict(checker_failed=True)
            return Verdict(blocked=True, reason="checker_unavailable", detail="the checker did not answer")
        flagged = sorted(_flagged_categories(results, checker.categories))
        if flagged:
            return Verdict(blocked=True, reason="flagged", detail=", ".join(flagged))
        return ALLOWED


def _flagged_categories(results: Iterable[Mapping[str, Any]], only: tuple[str, ...]) -> set[str]:
    flagged: set[str] = set()
    for result in results:
        categories = {name for name, on in (result.get("categories") or {}).items() if on}
        if only:
            flagged |= categories & set(only)
        elif result.get("flagged"):
            flagged |= categories or {"flagged"}
    return flagged


def message_text(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""
