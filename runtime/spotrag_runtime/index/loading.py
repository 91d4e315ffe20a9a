"""Read a corpus: text, Markdown, HTML (text only) and JSONL records into documents."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
JSONL_SUFFIXES = frozenset({".jsonl"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES
DEFAULT_TEXT_FIELD = "text"
DEFAULT_SOURCE_FIELD = "source"


class CorpusError(Exception):
    """The corpus cannot be read: a file that is missing, unreadable, not UTF-8 or malformed."""


class EmptyCorpusError(CorpusError):
    """The sources hold no text to index."""


@dataclass(frozen=True)
class Document:
    source: str  # relative to the folder it was found in, or the file's name; JSONL records may name their own
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_documents(
    sources: Sequence[str | Path],
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    source_field: str = DEFAULT_SOURCE_FIELD,
) -> list[Document]:
    """All documents under `sources` (files or folders, searched recursively), in a stable order.

    Folders contribute their files with a supported suffix; a file named directly
    must have one. Documents with no text are left out; no documents at all is an error.
    """
    if not sources:
        raise EmptyCorpusError("no corpus sources given")
    documents: list[Document] = []
    for source in sources:
        for path, name in _corpus_files(Path(source)):
            documents.extend(_read_file(path, name, text_field=text_field, source_field=source_field))
    if not documents:
        raise EmptyCorpusError(
            f"no text to index in {', '.join(str(s) for s in sources)} "
            f"(looked for {', '.join(sorted(SUPPORTED_SUFFIXES))} files with non-blank text)"
        )
    return documents


def _corpus_files(source: Path) -> Iterator[tuple[Path, str]]:
    if source.is_dir():
        # Sorted, so the same corpus gives the same passage ids (and a resumable build) on every run.
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in SUPPORTED_SUFFIXES and not path.is_dir():
                yield path, path.relative_to(source).as_posix()
        return
    if not source.exists() and not source.is_symlink():
        raise CorpusError(f"corpus source {source} does not exist")
    if source.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise CorpusError(
            f"{source}: unsupported file type {source.suffix!r}; supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    yield source, source.name


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops the byte-order mark that Windows editors write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}; convert it (e.g. iconv -t UTF-8)"
        ) from exc


def _read_file(path: Path, name: str, *, text_field: str, source_field: str) -> list[Document]:
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(text, path, name, text_field=text_field, source_field=source_field)
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    text = normalize_newlines(text)
    return [Document(name, text)] if text.strip() else []


def _read_jsonl(text: str, path: Path, name: str, *, text_field: str, source_field: str) -> list[Document]:
    documents = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{line_number}: not JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise CorpusError(
                f"{path}:{line_number}: no {text_field!r} field (set the text field name with --text-field)"
            )
        body = record.pop(text_field)
        if not isinstance(body, str):
            raise CorpusError(f"{path}:{line_number}: field {text_field!r} is {type(body).__name__}, not a string")
        source = record.pop(source_field, None)
        if body.strip():
            documents.append(
                Document(
                    str(source) if source is not None else f"{name}:{line_number}", normalize_newlines(body), record
                )
            )
    return documents


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Elements whose end starts a new paragraph in the extracted text.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li "
    "main nav ol p pre section table td th title tr ul".split()
)
# Elements whose content is not prose a reader sees.
_HIDDEN_TAGS = frozenset({"script", "style", "template", "noscript"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, with block elements as paragraphs and runs of spaces collapsed."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    paragraphs = (" ".join(block.split()) for block in "".join(extractor.parts).split("\n\n"))
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def read_questions(path: str | Path, *, field: str = "question") -> list[str]:
    """Questions to measure recall on: JSONL objects with a `field`, or plain text, one per line."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        questions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        questions = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{line_number}: not JSON: {exc.msg}") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise CorpusError(f"{path}:{line_number}: expected an object with a string {field!r} field")
            questions.append(record[field])
    if not questions:
        raise CorpusError(f"{path} holds no questions")
    return questions
