"""`python -m spotrag_runtime.index build|query|info`, the same as `spotrag index`."""

import sys

from .cli import cli

sys.exit(cli(sys.argv[1:]))
