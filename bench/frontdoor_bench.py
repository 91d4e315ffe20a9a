"""Front door benchmark: what the front door costs on the hot path, in front
of one spotrag gateway (RAG off) and two engine emulators.

Targets (one run, side by side, the same engines, gateway and load):

- ``gateway``: straight to the gateway (the baseline)
- ``front-door``: the front door (``spotrag front-door`` as a process) in
  front of that gateway; bytes relayed unparsed
- ``front-door-moderated``: the same with output moderation (a block list,
  200-character windows: every answer event parsed and held until its window
  is checked) and input moderation (the block list, PII redaction)

Each cell is a closed loop of C clients streaming chat completions of 64
tokens (engines: TTFT 20 ms, ITL 5 ms), as bench/gateway_bench.py measures
(the same client and counting code): requests/s, TTFT p50/p99, the
proxies' CPU per request (the gateway's for ``gateway``, the front door's
alone otherwise), errors.

    python bench/frontdoor_bench.py --concurrency 1,32,128 --out bench/frontdoor-results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import MODEL, free_port, proxy_process, run_cell, running_engines

TARGETS = ("gateway", "front-door", "front-door-moderated")
MODERATION = {"blockList": ["contraband", "forbidden phrase"], "redactPII": True, "windowChars": 200}


@contextlib.contextmanager
def gateway(urls: list[str], work: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = work / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "servedModelName": MODEL,
                "retrieval": {"enabled": False},
                "engines": {"discovery": "static", "urls": urls},
                "admission": {"maxQueuedRequests": 4096},
            }
        )
    )
    argv = [sys.executable, "-m", "spotrag_runtime.gateway.cli", "--config", str(config), "--port", str(port)]
    argv += ["--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    with proxy_process(argv, f"{base}/readyz", log=work / "gateway.log") as process:
        yield base, process.pid


@contextlib.contextmanager
def front_door(gateway_url: str, work: Path, *, moderated: bool) -> Iterator[tuple[str, int]]:
    port = free_port()
    backend = {"model": MODEL, "url": gateway_url}
    if moderated:
        backend["moderation"] = MODERATION
    config = work / f"frontdoor-{moderated}.json"
    config.write_text(json.dumps({"static": [backend]}))
    argv = [sys.executable, "-m", "spotrag_runtime.frontdoor.cli", "--config", str(config), "--port", str(port)]
    argv += ["--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    with proxy_process(argv, f"{base}/readyz", log=work / f"frontdoor-{moderated}.log") as process:
        yield base, process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each cell's window")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="spotrag-frontdoor-bench-"))
    results = []
    try:
        with running_engines(2) as engines, gateway([e.url for e in engines], work) as (gateway_url, gateway_pid):
            for target in args.targets.split(","):
                with contextlib.ExitStack() as stack:
                    if target == "gateway":
                        url, pid = gateway_url, gateway_pid
                    else:
                        moderated = target == "front-door-moderated"
                        url, pid = stack.enter_context(front_door(gateway_url, work, moderated=moderated))
                    for concurrency in (int(c) for c in args.concurrency.split(",")):
                        cell = run_cell(
                            target,
                            url,
                            concurrency,
                            warmup=args.warmup,
                            duration=args.duration,
                            proxy_pid=pid,
                            headers={},
                        )
                        results.append(cell.summary())
                        print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| target | concurrency | req/s | TTFT p50 ms | TTFT p99 ms | proxy CPU ms/req | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['target']} | {row['concurrency']} | {row['requests_per_second']} | {row['ttft_p50_ms']} | "
            f"{row['ttft_p99_ms']} | {row['proxy_cpu_ms_per_request']} | {row['errors']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
