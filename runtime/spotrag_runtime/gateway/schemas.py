"""Request bodies the gateway validates. Fields it does not know (temperature,
seed, stop, …) are kept and passed to the engine unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = 1
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    rag: bool | None = Field(default=None, description="false: plain chat, no retrieval (spotrag extension)")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class RagQueryRequest(BaseModel):
    """``POST /v1/rag/query``: a question in, the answer and the passages it used out."""

    model_config = ConfigDict(extra="allow")

    question: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(
        default_factory=list, description="the conversation so far, before the question (a chat's earlier turns)"
    )
    model: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)
    score_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    generate: bool = Field(default=True, description="false: return the passages only, no answer")
    stream: bool = Field(default=False, description="true: Server-Sent Events, the passages first, then the answer")
    stream_options: StreamOptions | None = None

    @field_validator("question")
    @classmethod
    def _not_blank(cls, question: str) -> str:
        if not question.strip():
            raise ValueError("must not be blank")
        return question.strip()
