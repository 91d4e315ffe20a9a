"""Loading a corpus and chunking it with the real MiniLM tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re

import pytest
from transformers import AutoTokenizer

from spotrag_runtime.index import (
    SAMPLE_CORPUS_DIR,
    Chunker,
    CorpusError,
    EmptyCorpusError,
    html_to_text,
    load_documents,
)
from spotrag_runtime.index.loading import read_questions
from spotrag_runtime.retrieval import DEFAULT_MODEL, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- loading ---------------------------------------------------------------


def test_sample_corpus_loads_every_format_with_relative_sources():
    documents = load_documents([SAMPLE_CORPUS_DIR])
    sources = {document.source for document in documents}
    assert "handbook/ticket-refunds.md" in sources
    assert "handbook/history.html" in sources
    assert "ja/typhoon-policy.md" in sources
    assert "announcements/2025-06-wifi" in sources  # a JSONL record names its own source
    wifi = next(document for document in documents if document.source == "announcements/2025-06-wifi")
    assert wifi.metadata == {"date": "2025-06-01", "author": "IT"}
    assert [document.source for document in documents] == [
        document.source for document in load_documents([SAMPLE_CORPUS_DIR])
    ]


def test_html_keeps_visible_text_as_paragraphs():
    text = html_to_text(
        "<html><head><title>Tides</title><style>p {color: red}</style></head>"
        "<body><h1>Skarholm</h1><p>Low   water &amp; spring\ntides.</p><script>var x = 1;</script>"
        "<ul><li>one</li><li>two</li></ul></body></html>"
    )
    assert text == "Tides\n\nSkarholm\n\nLow water & spring tides.\n\none\n\ntwo"


def test_jsonl_text_field_is_configurable_and_unnamed_records_get_file_and_line(tmp_path):
    (tmp_path / "faq.jsonl").write_text(
        json.dumps({"body": "Ferries leave hourly.", "lang": "en"})
        + "\n\n"
        + json.dumps({"body": "Cafés open late."})
        + "\n",
        encoding="utf-8",
    )
    documents = load_documents([tmp_path / "faq.jsonl"], text_field="body")
    assert [(d.source, d.text, d.metadata) for d in documents] == [
        ("faq.jsonl:1", "Ferries leave hourly.", {"lang": "en"}),
        ("faq.jsonl:3", "Cafés open late.", {}),
    ]


def test_not_utf8_names_the_file_and_the_byte(tmp_path):
    (tmp_path / "good.md").write_text("Fine text.", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Café in Skarholm".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt is not UTF-8: byte 0xe9 at offset 3"):
        load_documents([tmp_path])


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    assert load_documents([tmp_path])[0].text == "Hello"


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "moved.md").symlink_to(tmp_path / "nowhere.md")  # a link whose target is gone
    with pytest.raises(CorpusError, match=r"cannot read .*moved\.md: No such file or directory"):
        load_documents([tmp_path])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not JSON"),
        ('["a list"]', r"bad\.jsonl:2: expected a JSON object, got list"),
        ('{"title": "no text"}', r"bad\.jsonl:2: no 'text' field"),
        ('{"text": 42}', r"bad\.jsonl:2: field 'text' is int, not a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        load_documents([tmp_path])


def test_empty_corpus_is_refused_naming_the_sources(tmp_path):
    (tmp_path / "blank.md").write_text("  \n\n ", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(EmptyCorpusError, match=re.escape(str(tmp_path))):
        load_documents([tmp_path])


def test_missing_source_and_unsupported_file_are_named(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents([tmp_path / "absent"])
    (tmp_path / "slides.pdf").write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match=r"slides\.pdf: unsupported file type '\.pdf'"):
        load_documents([tmp_path / "slides.pdf"])


def test_questions_are_read_from_jsonl_or_lines(tmp_path):
    (tmp_path / "q.jsonl").write_text(
        '{"question": "When?"}\n\n{"question": "Where?", "source": "x"}\n', encoding="utf-8"
    )
    (tmp_path / "q.txt").write_text("When?\n  \nWhere?\n", encoding="utf-8")
    assert read_questions(tmp_path / "q.jsonl") == read_questions(tmp_path / "q.txt") == ["When?", "Where?"]
    (tmp_path / "bad.jsonl").write_text('{"q": "When?"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: expected an object with a string 'question' field"):
        read_questions(tmp_path / "bad.jsonl")


# --- chunking --------------------------------------------------------------


def test_chunks_fit_the_budget_and_their_ids_are_the_tokenizers(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=48, overlap_tokens=12)
    chunks = list(chunker.chunk_documents(load_documents([SAMPLE_CORPUS_DIR])))
    assert len(chunks) > 100
    for chunk in chunks:
        assert 0 < len(chunk.token_ids) <= 48
        # The builder embeds these ids directly, so they must be what the text tokenizes to.
        assert tokenizer(chunk.text, add_special_tokens=False)["input_ids"] == list(chunk.token_ids)
    positions = [chunk.position for chunk in chunks if chunk.source == "handbook/fleet.md"]
    assert positions == list(range(len(positions)))


def test_chunks_end_on_sentence_boundaries(tokenizer):
    text = " ".join(f"Sentence number {n} talks about ferry {n} and its crew." for n in range(30))
    chunks = Chunker(tokenizer, chunk_tokens=40, overlap_tokens=0).chunk_text(text)
    assert len(chunks) > 3
    assert all(chunk_text.endswith("crew.") and chunk_text.startswith("Sentence") for chunk_text, _ in chunks)
    assert " ".join(chunk_text for chunk_text, _ in chunks) == text  # nothing lost, nothing repeated


def test_overlap_repeats_whole_trailing_sentences(tokenizer):
    sentences = [f"Ship {n} sails at {n} o'clock." for n in range(20)]
    chunks = Chunker(tokenizer, chunk_tokens=40, overlap_tokens=14).chunk_text(" ".join(sentences))
    for (previous, _), (following, _) in zip(chunks, chunks[1:], strict=False):
        last_sentence = re.findall(r"Ship \d+ sails at \d+ o'clock\.", previous)[-1]
        assert following.startswith(last_sentence)


def test_paragraph_break_is_preferred_and_needs_no_overlap(tokenizer):
    first = " ".join(f"Tide table line {n} is short." for n in range(6))
    second = " ".join(f"Timetable row {n} lists a sailing." for n in range(6))
    # The first paragraph fills the chunk's second half; the second would fit partly after it.
    assert 30 <= token_count(tokenizer, first) < 60 < token_count(tokenizer, first + " " + second)
    chunks = Chunker(tokenizer, chunk_tokens=60, overlap_tokens=16).chunk_text(f"{first}\n\n{second}")
    assert chunks[0][0] == first  # cut at the paragraph, not mid-way through the second one
    assert chunks[1][0].startswith("Timetable row 0")


def test_japanese_splits_at_japanese_sentence_enders(tokenizer):
    text = "鏡島航路は一日六往復です。" * 6 + "台風のときは前日に判断します！" * 6 + "払い戻しはできますか？" * 6
    chunks = Chunker(tokenizer, chunk_tokens=40, overlap_tokens=0).chunk_text(text)
    assert len(chunks) > 2
    assert all(chunk_text[-1] in "。！？" for chunk_text, _ in chunks)
    assert "".join(chunk_text for chunk_text, _ in chunks) == text


def test_a_sentence_longer_than_a_chunk_is_cut_between_words(tokenizer):
    word = "Lighthousekeepers"
    per_word = token_count(tokenizer, word)
    assert per_word > 1  # so that a cut could fall inside a word
    text = " ".join([word] * 60)  # one 'sentence' with no ender
    chunks = Chunker(tokenizer, chunk_tokens=32, overlap_tokens=0).chunk_text(text)
    assert len(chunks) >= 60 * per_word // 32
    for chunk_text, ids in chunks:
        assert chunk_text.split(" ") == [word] * (len(ids) // per_word)
    assert " ".join(chunk_text for chunk_text, _ in chunks) == text


@pytest.mark.parametrize(("size", "overlap", "message"), [(8, 0, "at least 16"), (64, 40, "between 0 and half")])
def test_bad_chunk_settings_are_refused(tokenizer, size, overlap, message):
    with pytest.raises(ValueError, match=message):
        Chunker(tokenizer, chunk_tokens=size, overlap_tokens=overlap)
