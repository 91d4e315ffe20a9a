import sys

from .main import cli

raise SystemExit(cli(sys.argv[1:]))
