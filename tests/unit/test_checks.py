"""Problems found in what the cluster holds (operator/spotrag_operator/checks.py)."""

from __future__ import annotations

import pytest

from spotrag_operator.checks import find_problems, named_objects
from spotrag_operator.crd import defaulted_spec

from .operator_fixtures import ragdeployment

SECRET = {"apiVersion": "v1", "kind": "Secret"}


def test_a_missing_corpus_configmap_is_a_problem_only_while_retrieval_is_on():
    on = defaulted_spec(ragdeployment())
    assert ("ConfigMap", "handbook-docs") in named_objects(on)
    assert [p for p in find_problems(on, "default", {}) if "handbook-docs" in p]
    # Retrieval off: the corpus is not read, so its absence must not keep the deployment from Ready.
    off = defaulted_spec(ragdeployment({"retrieval": {"enabled": False}}))
    assert named_objects(off) == []
    assert find_problems(off, "default", {}) == []


@pytest.mark.parametrize(
    ("overrides", "named", "says"),
    [
        ({"gateway": {"apiKeySecret": "keys"}}, ("Secret", "keys"), "gateway.apiKeySecret names Secret 'keys'"),
        (
            {"model": {"hfTokenSecret": {"name": "hf", "key": "token"}}},
            ("Secret", "hf"),
            "model.hfTokenSecret names Secret 'hf'",
        ),
    ],
)
def test_a_named_secret_is_a_problem_only_while_it_is_missing(overrides, named, says):
    spec = defaulted_spec(ragdeployment({"retrieval": {"enabled": False}} | overrides))
    assert named_objects(spec) == [named]
    assert [p for p in find_problems(spec, "default", {named: None}) if says in p]
    assert find_problems(spec, "default", {named: SECRET}) == []
