"""The bundled sample corpus: the operations handbook of Halvard Ferry Lines, a made-up ferry company.

About forty short English documents (Markdown, one HTML page, one JSONL file of
announcements) and four Japanese ones, each fact stated in exactly one passage, plus
questions whose answers are known; used by the tests, the demo and the examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
SAMPLE_CORPUS_DIR = SAMPLE_DIR / "docs"
SAMPLE_QUESTIONS_FILE = SAMPLE_DIR / "questions.jsonl"


@dataclass(frozen=True)
class SampleQuestion:
    question: str
    source: str  # Passage.source of the passage that holds the answer
    answer: str  # a phrase that passage contains
    language: str = "en"


def load_sample_questions() -> list[SampleQuestion]:
    with SAMPLE_QUESTIONS_FILE.open(encoding="utf-8") as stream:
        return [SampleQuestion(**json.loads(line)) for line in stream if line.strip()]
