"""docs/metrics.md is what the code's metric definitions say."""

import subprocess
import sys

from .operator_fixtures import ROOT


def test_metrics_reference_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_metrics_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_metric_the_operator_scales_on_is_documented():
    text = (ROOT / "docs" / "metrics.md").read_text()
    assert "| `spotrag_queued_tokens` | gauge |" in text
    assert "| `spotrag_operator_cost_per_hour` | gauge |" in text
