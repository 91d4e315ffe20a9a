"""Settings every test shares. Fixtures live next to the tests that use them."""

import os

# Set before anything imports the operator's handlers (kopf reads timer
# intervals at import): reconcile every second in tests instead of every ten.
os.environ.setdefault("SPOTRAG_RECONCILE_INTERVAL", "1")
# Models come from installed packages only; never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread per process: on 2 cores, more threads only fight each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
