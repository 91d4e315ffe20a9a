"""Two builds of the gateway against each other on a shared machine: CPU per
streamed answer, A and B taking turns.

``bench/gateway_bench.py`` measures one target after another, so on a machine
shared with other work a change in the background load between two runs
reads as a change in the gateway. Here both gateways run side by side in
front of the same two engine emulators, and the load alternates between
them in short rounds (A, B, A, B, ...); the medians of the rounds are
compared. Each side's code comes from the folders given (prepended to its
PYTHONPATH, as ``gateway_bench.py --gateway-pythonpath`` does), e.g. a copy of
the base commit's ``runtime/`` against this checkout's:

    git archive HEAD~3 runtime | tar -x -C /tmp/before
    python bench/gateway_ab.py --a /tmp/uvl:/tmp/before/runtime --b /tmp/uvl --concurrency 32,128

With ``--py-spy PATH`` each side then gets one more turn at each concurrency
with py-spy recording it (collapsed stacks, ``--nonblocking``), and
``bench/pyspy_table.py`` turns the two recordings into the table of where the
CPU went.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.gateway_bench import Cell, run_cell, running_engines, start_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="", help="PYTHONPATH prefix of gateway A")
    parser.add_argument("--b", default="", help="PYTHONPATH prefix of gateway B")
    parser.add_argument("--concurrency", default="32,128")
    parser.add_argument("--rounds", type=int, default=5, help="turns each gateway gets per concurrency")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per turn")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each turn's window")
    parser.add_argument("--py-spy", help="py-spy command: record one more turn of each side with it")
    parser.add_argument("--profile-out", type=Path, default=Path("."), help="where the recordings go")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="spotrag-gateway-ab-"))
    try:
        with running_engines(2) as engines, contextlib.ExitStack() as stack:
            sides = {}
            for side, path in (("A", args.a), ("B", args.b)):
                (work / side).mkdir()
                options = argparse.Namespace(gateway_pythonpath=path, proxy_cpus=None)
                sides[side] = stack.enter_context(start_target("spotrag", engines, work / side, options))
            print("| C | gateway | CPU ms per answer, each turn | median | req/s median |")
            print("|---:|---|---|---:|---:|")
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                turns: dict[str, list] = {"A": [], "B": []}
                for _ in range(args.rounds):
                    for side, target in sides.items():
                        turns[side].append(turn(args, side, concurrency, *target).summary())
                for side, cells in turns.items():
                    cpu = [c["proxy_cpu_ms_per_request"] for c in cells]
                    errors = sum(c["errors"] for c in cells)
                    print(
                        f"| {concurrency} | {side}{f' ({errors} errors)' if errors else ''} | "
                        f"{' '.join(f'{x:.2f}' for x in cpu)} | {statistics.median(cpu):.2f} | "
                        f"{statistics.median(c['requests_per_second'] for c in cells):.1f} |",
                        flush=True,
                    )
                if args.py_spy:
                    for side, target in sides.items():
                        profile(args, side, concurrency, *target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def turn(args: argparse.Namespace, side: str, concurrency: int, url: str, pid: int, headers: dict) -> Cell:
    """One side's turn: the load on it alone, its CPU over the window."""
    return run_cell(
        f"spotrag-{side}",
        url,
        concurrency,
        warmup=args.warmup,
        duration=args.duration,
        proxy_pid=pid,
        headers=headers,
    )


def profile(args: argparse.Namespace, side: str, concurrency: int, url: str, pid: int, headers: dict) -> None:
    out = args.profile_out / f"pyspy-{side}-c{concurrency}.txt"
    seconds = int(args.warmup + args.duration) + 1
    spy = subprocess.Popen(
        [args.py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(seconds)]
        + ["--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cell = turn(args, side, concurrency, url, pid, headers)
    spy.wait()
    print(f"py-spy: {out} ({cell.summary()['proxy_cpu_ms_per_request']} ms CPU per answer under it)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
