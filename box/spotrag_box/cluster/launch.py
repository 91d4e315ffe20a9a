"""``python -m spotrag_box.cluster.launch PARENT_PID -- ARGV...``: exec ARGV
so that it dies with the simulated cluster.

The kubelet starts every container through this: Linux's parent-death
signal (prctl PR_SET_PDEATHSIG) kills the container when the thread that
started it goes, so even a test process killed with SIGKILL leaves no engine
or gateway running. Elsewhere (no prctl) it just execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m spotrag_box.cluster.launch PARENT_PID -- ARGV...", file=sys.stderr)
        sys.exit(2)
    parent = int(argv[0])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the kubelet's own cleanup is all there is
    if os.getppid() != parent:
        sys.exit(1)  # the cluster went away while we started
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
