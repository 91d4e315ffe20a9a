import sys

from .cli import cli

raise SystemExit(cli(sys.argv[1:]))
