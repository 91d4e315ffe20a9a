"""Problems found by looking at the cluster (operator/spotrag_operator/checks.py)."""

from __future__ import annotations

from spotrag_operator.checks import find_problems
from spotrag_operator.crd import defaulted_spec

from .operator_fixtures import ragdeployment


class EmptyNamespace:
    """A Kube that finds nothing: every object the spec names is missing."""

    def get(self, *_: object, **__: object) -> None:
        return None


def test_a_missing_corpus_configmap_is_a_problem_only_while_retrieval_is_on():
    on = ragdeployment()
    assert [p for p in find_problems(EmptyNamespace(), on, defaulted_spec(on)) if "handbook-docs" in p]
    # Retrieval off: the corpus is not read, so its absence must not keep the deployment from Ready.
    off = ragdeployment({"retrieval": {"enabled": False}})
    assert find_problems(EmptyNamespace(), off, defaulted_spec(off)) == []
