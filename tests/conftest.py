"""Settings every test shares. Fixtures live next to the tests that use them."""

import os
from pathlib import Path

# Models come from installed packages only; never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread per process: on 2 cores, more threads only fight each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test reaches a real cluster by accident: the implicit kubeconfig is a file
# that does not exist and in-cluster config is off, so a client built without
# the stand-in's kubeconfig fails at once. Tests name the stand-in's kubeconfig;
# the e2e mode for a real cluster names its own (SPOTRAG_E2E_KUBECONFIG).
NO_CLUSTER_KUBECONFIG = str(Path(__file__).parent / "no-cluster-kubeconfig")
os.environ["KUBECONFIG"] = NO_CLUSTER_KUBECONFIG
os.environ.pop("KUBERNETES_SERVICE_HOST", None)
