"""How much one emulator sustains: closed-loop streaming load, and its CPU cost.

Starts an emulator, keeps ``--concurrency`` chat streams going for
``--seconds`` and reports requests/s, chunks/s and the emulator's CPU use
per chunk (from /proc). The client is a minimal raw HTTP/1.1 client on
keep-alive connections, far cheaper than httpx or openai, so the emulator
rather than the client is what gets measured. Linux only (reads /proc).

    python -m spotrag_runtime.engine_emulator.loadtest --concurrency 512 --max-num-seqs 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

from .process import EmulatorProcess, start_engine_emulator


@dataclass
class LoadResult:
    requests: int
    chunks: int
    wall_s: float
    emulator_cpu_s: float

    def summary(self) -> str:
        return (
            f"{self.requests / self.wall_s:.1f} req/s, {self.chunks / self.wall_s:.0f} chunks/s, "
            f"emulator CPU {self.emulator_cpu_s / self.wall_s:.0%} of a core, "
            f"{self.emulator_cpu_s / max(self.chunks, 1) * 1e6:.0f} us per chunk"
        )


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime, fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream_forever(
    engine: EmulatorProcess, worker: int, max_tokens: int, until: float, counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(engine.host, engine.port)
    try:
        sent = 0
        while time.monotonic() < until:
            body = json.dumps(
                {
                    "messages": [{"role": "user", "content": f"question {worker} {sent}"}],
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "stream": True,
                }
            ).encode()
            sent += 1
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: emulator\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the emulator closed the connection mid-stream")
                counts[1] += data.count(b"data: {")
                tail = (tail + data)[-32:]
                # The end of the SSE stream and of the chunked body.
                if tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                    break
            counts[0] += 1
    finally:
        writer.close()


async def run_load(engine: EmulatorProcess, *, concurrency: int, seconds: float, max_tokens: int) -> LoadResult:
    counts = [0, 0]  # requests, chunks
    cpu_before, started = process_cpu_seconds(engine.pid), time.monotonic()
    until = started + seconds
    await asyncio.gather(*(_stream_forever(engine, worker, max_tokens, until, counts) for worker in range(concurrency)))
    wall = time.monotonic() - started
    return LoadResult(counts[0], counts[1], wall, process_cpu_seconds(engine.pid) - cpu_before)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotrag_runtime.engine_emulator.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    with start_engine_emulator(max_num_seqs=args.max_num_seqs, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms) as engine:
        engine.wait_ready()
        result = asyncio.run(
            run_load(engine, concurrency=args.concurrency, seconds=args.seconds, max_tokens=args.max_tokens)
        )
    print(
        f"concurrency {args.concurrency}, max-num-seqs {args.max_num_seqs}, {args.max_tokens} tokens: "
        + result.summary()
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
