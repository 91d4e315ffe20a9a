"""A capacity profile of the real vLLM server on the GPU machine (issue 17).

    # on the GPU machine, vLLM 0.26.0 from ../shared/vllm, model shapes from make_model.py:
    python3 bench/vllm_capacity.py --model /tmp/l8b --out $OUT --repeats 3

Serves a real-sized model (Llama-3.1-8B shapes, --load-format dummy: random
bf16 weights, the real speed and memory) and measures, each point `--repeats`
times: the start to /health 200, the KV cache in tokens, prefill tokens/s by
prompt length (bursts of max_tokens=1 requests), decode tokens/s and
inter-token latency by batch size (ignore_eos fixes output lengths), and TTFT
against the prompt tokens queued ahead. Prompts are random token ids, so
nothing is cached or shared. Writes capacity.json and capacity.md.

`--engine emulator` runs the same sweep against spotrag's engine emulator with
the capacity model measured here (`--hardware h200-llama-3.1-8b`), to hold the
emulator against the real numbers (here, no GPU needed):

    python bench/vllm_capacity.py --engine emulator --out /tmp/emulator --repeats 1  # kept as bench/vllm/emulator-capacity.*
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import re
import signal
import statistics
import subprocess
import sys
import time

PORT = 8000
PREFILL_LENGTHS = (256, 1024, 4096, 8192)
PREFILL_BURST_TOKENS = 131_072  # prompt tokens per burst: enough to keep the engine busy for seconds
DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
DECODE_PROMPT, DECODE_OUTPUT = 128, 256


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(session, prompt_tokens: int, output_tokens: int, rng: random.Random) -> dict:
    """A streamed completion of random token ids; arrival times of every chunk."""
    body = {
        "model": "l8b",
        "prompt": [rng.randrange(1000, 120_000) for _ in range(prompt_tokens)],
        "max_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    times: list[float] = []
    async with session.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter() - started)
    return {"started": started, "ttft": times[0], "chunks": times}


async def burst(count: int, prompt_tokens: int, output_tokens: int, seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(session, prompt_tokens, output_tokens, rng) for _ in range(count)))
        wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    first_token = min(r["started"] + r["ttft"] for r in results)
    last_token = max(r["started"] + r["chunks"][-1] for r in results)
    return {
        "requests": count,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_s": wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_max_s": max(ttfts),
        "prompt_tok_per_s": count * prompt_tokens / max(ttfts),
        # Decode: output tokens after the first, over the time the engine spent producing them.
        "decode_tok_per_s": count * (output_tokens - 1) / (last_token - first_token) if output_tokens > 1 else None,
        "itl_p50_s": statistics.median(gaps) if gaps else None,
        "itl_p95_s": percentile(gaps, 0.95) if gaps else None,
    }


def wait_ready(process: subprocess.Popen, timeout: float) -> float:
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"vllm serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit("vllm serve was not ready in time")


def kv_cache_tokens(log_text: str) -> int | None:
    match = re.search(r"GPU KV cache size: ([\d,]+) tokens", log_text)
    return int(match.group(1).replace(",", "")) if match else None


def markdown(profile: dict) -> str:
    lines = [
        f"vLLM {profile['vllm']} on {profile['gpu']}, {profile['model']}, {profile['repeats']} repeats per point",
        "",
        f"start to /health 200: {profile['start_s']:.1f} s; KV cache: {profile['kv_cache_tokens']} tokens",
        "",
        "| requests × prompt / output | prompt tok/s (median, min–max) | TTFT p50 / max (median) | decode tok/s | ITL p50 / p95 |",
        "|---|---|---|---|---|",
    ]
    for point in profile["points"]:
        runs = point["runs"]

        def spread(key: str, runs=runs) -> str:
            values = [r[key] for r in runs if r[key] is not None]
            if not values:
                return "–"
            return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"

        ttft = f"{statistics.median(r['ttft_p50_s'] for r in runs):.3f} / {statistics.median(r['ttft_max_s'] for r in runs):.3f} s"
        itl = (
            f"{statistics.median(r['itl_p50_s'] for r in runs) * 1000:.1f} / {statistics.median(r['itl_p95_s'] for r in runs) * 1000:.1f} ms"
            if runs[0]["itl_p50_s"] is not None
            else "–"
        )
        lines.append(
            f"| {runs[0]['requests']} × {runs[0]['prompt_tokens']:,} / {runs[0]['output_tokens']} "
            f"| {spread('prompt_tok_per_s') if runs[0]['output_tokens'] == 1 else '–'} | {ttft} "
            f"| {spread('decode_tok_per_s')} | {itl} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "emulator"], default="vllm")
    parser.add_argument("--model", help="model folder (make_model.py --shape llama-8b), for vllm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=16384)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "capacity-server.log"
    if args.engine == "vllm":
        if not args.model:
            parser.error("--model is needed for --engine vllm")
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--served-model-name", "l8b"]
        command += ["--port", str(PORT), "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len"]
        command += [str(args.max_model_len), "--gpu-memory-utilization", "0.9", "--no-enable-prefix-caching"]
    else:
        command = [sys.executable, "-m", "spotrag_runtime.engine_emulator", "--hardware", "h200-llama-3.1-8b"]
        command += ["--served-model-name", "l8b", "--port", str(PORT), "--max-model-len", str(args.max_model_len)]
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = wait_ready(process, timeout=400)
        print(f"ready after {start:.1f} s", flush=True)
        if args.engine == "vllm":
            import vllm

            version = vllm.__version__
        else:
            version = "spotrag engine emulator, --hardware h200-llama-3.1-8b, on"
        profile = {
            "vllm": version,
            "gpu": subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
            if args.engine == "vllm"
            else f"this machine's CPU ({os.cpu_count()} cores)",
            "model": "Llama-3.1-8B shapes, --load-format dummy, bf16, TP 1, prefix caching off"
            if args.engine == "vllm"
            else "its measured capacity model",
            "command": command[3:],
            "repeats": args.repeats,
            "start_s": start,
            "kv_cache_tokens": kv_cache_tokens(log_path.read_text()),
            "points": [],
        }
        asyncio.run(burst(4, 512, 16, seed=0))  # warm-up: first requests compile and allocate
        plan = [(PREFILL_BURST_TOKENS // length, length, 1) for length in PREFILL_LENGTHS]
        plan += [(batch, DECODE_PROMPT, DECODE_OUTPUT) for batch in DECODE_BATCHES]
        plan += [(64, 1000, 128)]  # mixed, as in the first look
        for count, prompt, output in plan:
            runs = [asyncio.run(burst(count, prompt, output, seed=repeat)) for repeat in range(args.repeats)]
            profile["points"].append({"runs": runs})
            print(json.dumps(runs[-1]), flush=True)
            (out / "capacity.json").write_text(json.dumps(profile, indent=1))
        (out / "capacity.md").write_text(markdown(profile))
        print(markdown(profile))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
