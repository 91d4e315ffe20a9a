"""``spotrag engine-emulator``: run one emulated vLLM engine in the foreground."""

from __future__ import annotations

import sys

from .config import config_from_args, parse_arguments


def cli(argv: list[str]) -> int:
    parser, args = parse_arguments(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    # The server pulls in uvicorn and starlette; --help and bad flags need neither.
    from .server import serve

    try:
        return serve(config)
    except OSError as exc:
        print(f"spotrag engine-emulator: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
