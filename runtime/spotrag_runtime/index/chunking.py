"""Token-aware chunking on paragraph and sentence boundaries, for English and Japanese text.

Sizes are counted with the embedding model's own tokenizer, so a chunk never runs
past what the model reads (a token it truncates is text that retrieval can never find).
A chunk is built from whole sentences, ends at a paragraph break when one falls in
its second half, and only a sentence longer than a whole chunk is cut inside.
Overlap repeats whole trailing sentences (up to `overlap_tokens`) at the start of
the next chunk when a cut falls inside a paragraph; a cut at a paragraph break needs none.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .loading import Document

# The seed's 300 would not fit: MiniLM reads 256 positions, [CLS]/[SEP] and any passage
# prefix included, and silently drops the rest. 160 leaves that room, keeps a typical
# paragraph whole, and stays near the 128-token inputs MiniLM was tuned on: mean pooling
# dilutes one fact in a long chunk (docs/benchmarks.md compares sizes on the bundled questions).
DEFAULT_CHUNK_TOKENS = 160
DEFAULT_OVERLAP_TOKENS = 24
MIN_CHUNK_TOKENS = 16

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at . ! ? followed by closing quotes/brackets and whitespace, at the
# Japanese enders 。！？ (no space follows them in Japanese), or at a line break
# (list items and headings are units of their own).
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+|[。！？!?]+[」』）)]*\s*|\n\s*")


@dataclass(frozen=True)
class Chunk:
    source: str
    position: int  # order within the source document, from 0
    text: str
    token_ids: tuple[int, ...]  # the tokenizer's ids for `text`, without special tokens
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Segment:
    first_token: int
    end_token: int  # exclusive
    starts_paragraph: bool

    @property
    def tokens(self) -> int:
        return self.end_token - self.first_token


class Chunker:
    def __init__(
        self, tokenizer: Any, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    ) -> None:
        if chunk_tokens < MIN_CHUNK_TOKENS:
            raise ValueError(f"chunk size must be at least {MIN_CHUNK_TOKENS} tokens, got {chunk_tokens}")
        if not 0 <= overlap_tokens <= chunk_tokens // 2:
            raise ValueError(
                f"overlap must be between 0 and half the chunk size ({chunk_tokens // 2}), got {overlap_tokens}"
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens

    def settings(self) -> dict[str, Any]:
        return {
            "chunk_tokens": self.chunk_tokens,
            "overlap_tokens": self.overlap_tokens,
            "boundaries": "paragraph,sentence",
        }

    def chunk_documents(self, documents: Iterable[Document], *, batch_size: int = 1024) -> Iterator[Chunk]:
        batch: list[Document] = []
        for document in documents:
            batch.append(document)
            if len(batch) == batch_size:
                yield from self._chunk_batch(batch)
                batch = []
        if batch:
            yield from self._chunk_batch(batch)

    def chunk_text(self, text: str) -> list[tuple[str, tuple[int, ...]]]:
        """(text, token ids) of each chunk of one text; for tests and tools."""
        return [(chunk.text, chunk.token_ids) for chunk in self._chunk_batch([Document("-", text)])]

    def _chunk_batch(self, documents: Sequence[Document]) -> Iterator[Chunk]:
        # One batched call: the fast tokenizer spreads a batch over its own threads.
        encoded = self.tokenizer(
            [document.text for document in documents],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # documents are longer than the model's limit by design: no warning
        )
        for document, ids, offsets in zip(documents, encoded["input_ids"], encoded["offset_mapping"], strict=False):
            starts = [start for start, _ in offsets]
            segments = self._split_long(_segments(document.text, starts), document.text, offsets)
            for position, (first, last) in enumerate(self._pack(segments)):
                first_token, end_token = segments[first].first_token, segments[last].end_token
                text = document.text[offsets[first_token][0] : offsets[end_token - 1][1]]
                yield Chunk(document.source, position, text, tuple(ids[first_token:end_token]), dict(document.metadata))

    def _pack(self, segments: list[_Segment]) -> Iterator[tuple[int, int]]:
        """Greedy packing of segments into chunks: (first, last) segment indexes, inclusive."""
        start = 0
        while start < len(segments):
            end, total = start, 0
            while end < len(segments) and total + segments[end].tokens <= self.chunk_tokens:
                total += segments[end].tokens
                end += 1
            at_paragraph = end == len(segments) or segments[end].starts_paragraph
            if not at_paragraph:
                # Prefer ending at the last paragraph break in the chunk's second half.
                filled = 0
                for candidate in range(start, end):
                    if candidate > start and segments[candidate].starts_paragraph and filled >= self.chunk_tokens // 2:
                        end, at_paragraph = candidate, True
                    filled += segments[candidate].tokens
            yield start, end - 1
            if end >= len(segments):
                return
            next_start, carried = end, 0
            if not at_paragraph:
                while next_start - 1 > start and carried + segments[next_start - 1].tokens <= self.overlap_tokens:
                    next_start -= 1
                    carried += segments[next_start].tokens
            start = next_start

    def _split_long(self, segments: list[_Segment], text: str, offsets: Sequence[tuple[int, int]]) -> list[_Segment]:
        """Cut sentences longer than a chunk, between words where possible."""
        result = []
        for segment in segments:
            first, paragraph = segment.first_token, segment.starts_paragraph
            while segment.end_token - first > self.chunk_tokens:
                cut = first + self.chunk_tokens
                for candidate in range(cut, first + self.chunk_tokens // 2, -1):
                    if not _inside_word(text, offsets, candidate):
                        cut = candidate
                        break
                result.append(_Segment(first, cut, paragraph))
                first, paragraph = cut, False
            result.append(_Segment(first, segment.end_token, paragraph))
        return result


def _segments(text: str, token_starts: list[int]) -> list[_Segment]:
    """Sentences as token ranges, each marked when it opens a paragraph."""
    segments = []
    paragraph_start = 0
    for paragraph_break in [*_PARAGRAPH_BREAK.finditer(text), None]:
        paragraph_end = paragraph_break.start() if paragraph_break else len(text)
        sentence_start, first_in_paragraph = paragraph_start, True
        ends = [m.end() for m in _SENTENCE_END.finditer(text, paragraph_start, paragraph_end)]
        for sentence_end in [*ends, paragraph_end]:
            first_token = bisect.bisect_left(token_starts, sentence_start)
            end_token = bisect.bisect_left(token_starts, sentence_end)
            if end_token > first_token:
                segments.append(_Segment(first_token, end_token, first_in_paragraph))
                first_in_paragraph = False
            sentence_start = sentence_end
        if paragraph_break:
            paragraph_start = paragraph_break.end()
    return segments


def _inside_word(text: str, offsets: Sequence[tuple[int, int]], token: int) -> bool:
    """Whether a cut before `token` would split a word (e.g. "reclaim" | "##ed")."""
    previous_end, start = offsets[token - 1][1], offsets[token][0]
    return (
        previous_end == start
        and text[start - 1 : start].isascii()
        and text[start - 1 : start].isalnum()
        and text[start].isalnum()
    )
