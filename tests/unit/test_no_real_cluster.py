"""The test session cannot reach a real cluster through ~/.kube/config or in-cluster config."""

import pytest
from kubernetes.config import ConfigException

from spotrag_runtime.kubeconfig import load_configuration
from tests.conftest import NO_CLUSTER_KUBECONFIG


def test_a_client_without_the_stand_ins_kubeconfig_fails_instead_of_finding_a_cluster() -> None:
    with pytest.raises(ConfigException, match="No configuration found"):
        load_configuration()
    assert NO_CLUSTER_KUBECONFIG.endswith("no-cluster-kubeconfig")
