"""From retrieved passages and a question to the messages an engine gets.

Passages become numbered contexts (``[1] …``, ``[2] …``) so the answer can
cite them, best first, until the context token budget is spent: a passage
that no longer fits is cut to what is left (when that is worth keeping) and
the rest are dropped, so long passages never overflow the model's context.
Tokens here are counted with the embedding model's tokenizer; the exact check
against the engine's context length happens later on the whole prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spotrag_runtime.gateway.config import PromptConfig
from spotrag_runtime.gateway.errors import InvalidRequest
from spotrag_runtime.gateway.retrieval_service import RetrievedPassage

# A cut passage keeps at least this many tokens, or is dropped instead.
MIN_CUT_TOKENS = 32
NO_CONTEXTS = "(no references were found)"
_PLACEHOLDER = re.compile(r"\{(contexts|question)\}")


@dataclass(frozen=True)
class Context:
    number: int
    passage: RetrievedPassage
    text: str
    truncated: bool


def select_contexts(passages: Sequence[RetrievedPassage], token_budget: int) -> list[Context]:
    contexts: list[Context] = []
    remaining = token_budget
    for passage in passages:
        text = passage.passage.text.strip()
        if passage.tokens <= remaining:
            contexts.append(Context(len(contexts) + 1, passage, text, truncated=False))
            remaining -= passage.tokens
            continue
        if remaining >= MIN_CUT_TOKENS:
            # Cut by the share of tokens that fits, at a word boundary.
            keep = len(text) * remaining // max(passage.tokens, 1)
            cut = text[:keep].rsplit(None, 1)[0] if " " in text[:keep] else text[:keep]
            contexts.append(Context(len(contexts) + 1, passage, cut + " …", truncated=True))
        break
    return contexts


def render_contexts(contexts: Sequence[Context]) -> str:
    if not contexts:
        return NO_CONTEXTS
    return "\n\n".join(f"[{context.number}] {context.text}" for context in contexts)


def fill_template(template: str, *, contexts: str, question: str) -> str:
    # One pass, so braces inside passages or the question are left alone.
    values = {"contexts": contexts, "question": question}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def message_text(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def last_user_question(messages: Sequence[dict[str, Any]]) -> tuple[int, str]:
    """Where the question is (the last user message) and its text."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            text = message_text(messages[index].get("content")).strip()
            if not text:
                raise InvalidRequest("The last user message has no text to answer.", param="messages")
            return index, text
    raise InvalidRequest("Retrieval needs a user message with the question.", param="messages")


class PromptBuilder:
    def __init__(self, config: PromptConfig) -> None:
        self.config = config

    def contexts(self, passages: Sequence[RetrievedPassage], *, token_budget: int | None = None) -> list[Context]:
        budget = self.config.context_token_budget if token_budget is None else token_budget
        return select_contexts(passages, budget)

    def messages(
        self, messages: Sequence[dict[str, Any]], question_at: int, question: str, contexts: Sequence[Context]
    ) -> list[dict[str, Any]]:
        """The conversation with the question replaced by the filled template,
        and the configured system prompt first (before the client's own, if any)."""
        out = [dict(message) for message in messages]
        out[question_at]["content"] = fill_template(
            self.config.template, contexts=render_contexts(contexts), question=question
        )
        system = self.config.system.strip()
        if system:
            if out and out[0].get("role") == "system":
                client_system = message_text(out[0].get("content")).strip()
                out[0]["content"] = f"{system}\n\n{client_system}" if client_system else system
            else:
                out.insert(0, {"role": "system", "content": system})
        return out
