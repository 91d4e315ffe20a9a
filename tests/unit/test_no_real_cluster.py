"""The test session cannot reach a real cluster through ~/.kube/config or in-cluster config."""

import os

import pytest
from kubernetes.config import ConfigException

from spotrag_runtime.kube import load_configuration
from tests.conftest import NO_CLUSTER_KUBECONFIG


def test_a_client_without_the_stand_ins_kubeconfig_fails_instead_of_finding_a_cluster() -> None:
    assert os.environ["KUBECONFIG"] == NO_CLUSTER_KUBECONFIG
    assert "KUBERNETES_SERVICE_HOST" not in os.environ
    with pytest.raises(ConfigException, match="No configuration found"):
        load_configuration()
