"""vLLM's OpenAI wire format: request models, the error envelope, response bodies.

Requests are validated with pydantic (unknown fields are accepted and
ignored, as vLLM does; sampling parameters such as ``temperature`` or
``stop`` are accepted and have no effect, since the text is deterministic).
Stream chunks are rendered from prebuilt string templates because they are
the hot path: one per token per stream.
"""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .text import Message


class APIError(Exception):
    """An error answered in vLLM's envelope: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: HTTPStatus, message: str, *, err_type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or ERROR_TYPES.get(status, status.phrase.replace(" ", "") + "Error")
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status.value}
        }


# vLLM's is "vllm-<version>-<hash>"; this one says where the answer came from.
SYSTEM_FINGERPRINT = "vllm-0.26.0-spotrag-emulator"

ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
}


def _request_validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI's RequestValidationError as vLLM 0.26 words it: type "Bad Request",
    param the first error's location under "body" (e.g. "body.messages")."""
    plural = "s" if len(errors) != 1 else ""
    message = f"{len(errors)} validation error{plural}:\n" + "\n".join(f"  {error}" for error in errors)
    param = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
    return APIError(HTTPStatus.BAD_REQUEST, message, err_type="Bad Request", param=param)


def validation_error(exc: ValidationError) -> APIError:
    errors = []
    for error in exc.errors(include_url=False):
        error = dict(error)
        error["loc"] = ("body", *error["loc"])
        errors.append(error)
    return _request_validation_error(errors)


def parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        error = {
            "type": "json_invalid",
            "loc": ("body", exc.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        raise _request_validation_error([error]) from None
    except UnicodeDecodeError as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, f"The request body is not valid UTF-8: {exc}") from None


# -- requests ------------------------------------------------------------------


class _Lenient(BaseModel):
    # OpenAI's API allows extra fields; vLLM ignores them, and so do we.
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessageParam(_Lenient):
    role: str
    content: str | list[TextPart] | None = None

    def to_message(self) -> Message:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(part.text for part in self.content)
        return Message(self.role, text)


class StreamOptions(_Lenient):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _GenerationRequest(_Lenient):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    n: int = 1
    request_id: str | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.n != 1:
            raise ValueError("n must be 1: the engine emulator generates one choice per request")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _check_continue(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    # Text, or token ids as vLLM takes them; the emulator's tokens are words, so
    # ids become one word each and count as many tokens as were sent.
    prompt: str | list[str] | list[int]

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and all(isinstance(token, int) for token in self.prompt):
            return " ".join(f"t{token}" for token in self.prompt)
        if len(self.prompt) != 1:
            raise APIError(
                HTTPStatus.BAD_REQUEST,
                "prompt must be one string: the engine emulator does not batch prompts",
                param="prompt",
            )
        return self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeCompletionRequest(_Lenient):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _check_continue(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


def parse_request(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise APIError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None


# -- responses -----------------------------------------------------------------


def new_request_id(prefix: str, client_id: str | None) -> str:
    return f"{prefix}-{client_id or uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


class StreamFormatter:
    """Renders one stream's SSE events (chat or text completion) in vLLM's chunk format."""

    def __init__(self, *, chat: bool, request_id: str, model: str, prompt_tokens: int, continuous_usage: bool) -> None:
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.continuous_usage = continuous_usage
        self.created = int(time.time())
        object_type = "chat.completion.chunk" if chat else "text_completion"
        self.head = (
            f'data: {{"id":{json.dumps(request_id)},"object":"{object_type}",'
            f'"created":{self.created},"model":{json.dumps(model)},'
        )
        self._request_id = request_id
        self._model = model
        self._object_type = object_type

    def _usage_suffix(self, completion_tokens: int) -> str:
        if not self.continuous_usage:
            return ""
        return ',"usage":' + json.dumps(usage(self.prompt_tokens, completion_tokens), separators=(",", ":"))

    def role(self, completion_tokens: int = 0) -> bytes:
        """The first chat chunk: the assistant role and empty content, as vLLM sends it."""
        return (
            self.head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            '"logprobs":null,"finish_reason":null}]'
            + self._usage_suffix(completion_tokens)
            + ',"prompt_token_ids":null,"prompt_text":null}\n\n'
        ).encode()

    def delta(self, text: str, finish_reason: str | None, completion_tokens: int) -> bytes:
        finish = "null" if finish_reason is None else f'"{finish_reason}"'
        # vLLM adds stop_reason only to the chunk that finishes a choice.
        stop = ',"stop_reason":null' if finish_reason is not None else ""
        if self.chat:
            delta = '{"content":' + json.dumps(text) + "}" if text else "{}"
            choice = f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}{stop},"token_ids":null}}'
        else:
            choice = (
                f'{{"index":0,"text":{json.dumps(text)},"logprobs":null,"finish_reason":{finish},"stop_reason":null,'
                '"prompt_token_ids":null,"token_ids":null}'
            )
        return (self.head + '"choices":[' + choice + "]" + self._usage_suffix(completion_tokens) + "}\n\n").encode()

    def final_usage(self, completion_tokens: int) -> bytes:
        chunk = {
            "id": self._request_id,
            "object": self._object_type,
            "created": self.created,
            "model": self._model,
            "choices": [],
            "usage": usage(self.prompt_tokens, completion_tokens),
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    @staticmethod
    def error(error: APIError) -> bytes:
        return b"data: " + json.dumps(error.body()).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def chat_completion_body(
    *, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    message = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": {**usage(prompt_tokens, completion_tokens), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def completion_body(
    *, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": {**usage(prompt_tokens, completion_tokens), "prompt_tokens_details": None},
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }
