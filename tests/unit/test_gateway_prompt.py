"""Prompt building: numbered contexts within a token budget, the template,
and where the question and the system prompt go."""

from __future__ import annotations

import pytest

from spotrag_runtime.gateway.config import PromptConfig
from spotrag_runtime.gateway.errors import InvalidRequest
from spotrag_runtime.gateway.prompt import (
    MIN_CUT_TOKENS,
    NO_CONTEXTS,
    PromptBuilder,
    fill_template,
    last_user_question,
    render_contexts,
    select_contexts,
)
from spotrag_runtime.gateway.retrieval_service import RetrievedPassage
from spotrag_runtime.retrieval import Passage


def retrieved(text: str, tokens: int, passage_id: int = 0) -> RetrievedPassage:
    return RetrievedPassage(Passage(passage_id, text, f"doc{passage_id}.md", 0, {}), 0.5, tokens)


def test_contexts_are_numbered_best_first_within_the_budget() -> None:
    passages = [retrieved("alpha beta", 40, 1), retrieved("gamma delta", 50, 2), retrieved("epsilon", 30, 3)]
    contexts = select_contexts(passages, token_budget=100)
    # 40 + 50 fit; 30 more would not, and 10 left is too little to be worth a cut.
    assert [(c.number, c.passage.passage.id, c.truncated) for c in contexts] == [(1, 1, False), (2, 2, False)]
    assert render_contexts(contexts) == "[1] alpha beta\n\n[2] gamma delta"


def test_a_passage_that_does_not_fit_is_cut_at_a_word_to_what_is_left() -> None:
    words = " ".join(f"word{i}" for i in range(200))
    contexts = select_contexts([retrieved("short", 10), retrieved(words, 200)], token_budget=10 + 100)
    assert len(contexts) == 2 and contexts[1].truncated
    cut = contexts[1].text
    assert cut.endswith(" …")
    kept = cut.removesuffix(" …")
    assert words.startswith(kept) and words[len(kept)] == " "  # a whole-word cut
    assert len(kept) <= len(words) * 100 // 200  # no more than the share of tokens that fits
    too_little = select_contexts([retrieved(words, 200)], token_budget=MIN_CUT_TOKENS - 1)
    assert too_little == []
    assert render_contexts(too_little) == NO_CONTEXTS


def test_the_template_is_filled_once_so_braces_in_text_are_left_alone() -> None:
    template = 'Answer as JSON like {"a": 1}.\n{contexts}\nQ: {question}'
    filled = fill_template(template, contexts="[1] a {question} b", question="what is {contexts}?")
    assert filled == 'Answer as JSON like {"a": 1}.\n[1] a {question} b\nQ: what is {contexts}?'


def test_the_last_user_message_is_the_question() -> None:
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question"}]},
    ]
    assert last_user_question(messages) == (2, "second\nquestion")
    with pytest.raises(InvalidRequest, match="needs a user message"):
        last_user_question([{"role": "system", "content": "x"}])
    with pytest.raises(InvalidRequest, match="has no text"):
        last_user_question([{"role": "user", "content": "   "}])


def test_messages_get_the_template_and_the_configured_system_prompt_first() -> None:
    builder = PromptBuilder(PromptConfig(system="Use the references.", template="{contexts}\n\nQ: {question}"))
    contexts = builder.contexts([retrieved("the ferry leaves at nine", 6)])
    plain = builder.messages([{"role": "user", "content": "when?"}], 0, "when?", contexts)
    assert plain == [
        {"role": "system", "content": "Use the references."},
        {"role": "user", "content": "[1] the ferry leaves at nine\n\nQ: when?"},
    ]
    conversation = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "when?", "name": "ana"},
    ]
    merged = builder.messages(conversation, 1, "when?", contexts)
    assert merged[0] == {"role": "system", "content": "Use the references.\n\nAnswer in French."}
    assert merged[1] == {"role": "user", "content": "[1] the ferry leaves at nine\n\nQ: when?", "name": "ana"}
    assert conversation[1]["content"] == "when?"  # the client's request is not changed in place
