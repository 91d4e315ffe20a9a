"""Cold-start numbers of the real vLLM server for issue 18 (on the GPU machine).

    # run 1 (vLLM part aa): stage vLLM, make the model, write its weights to local disk
    bash .gpu/unpack.sh && python3 .gpu/make_model.py /tmp/l8b --shape llama-8b \
        && python3 bench/vllm_coldstart.py weights --model /tmp/l8b
    # run 2 (part ab, within ~30 s so /tmp is kept): load from disk, then with the compile cache (~5 min)
    bash .gpu/unpack.sh && . .gpu/env.sh && python3 bench/vllm_coldstart.py measure --model /tmp/l8b \
        --out $OUT --steps first,compiled
    # run 3 (warm machine): sleep/wake cycles and the streamer (~4 min)
    . .gpu/env.sh && python3 bench/vllm_coldstart.py measure --model /tmp/l8b --out $OUT \
        --steps sleep,streamer --keep-cache

`weights` writes random bf16 safetensors of the model's shapes (Llama-3.1-8B:
16 GB, in 4 shards) next to its config, so vLLM reads real-sized weights from
the local disk as it would from spotrag's node model cache.

`measure` then, each a fresh `vllm serve`, with VLLM_CACHE_ROOT on a folder
of its own as the node cache has it:
  1. first start, weights from disk, compile cache empty: start to /health 200,
     and vLLM's own "Loading weights took" / "Model loading took" lines;
  2. the same again, compile cache kept (spotrag's node cache keeps it);
  3. with --enable-sleep-mode (VLLM_SERVER_DEV_MODE=1): POST /sleep?level=1 and
     POST /wake_up, `--cycles` times, GPU memory asleep and awake (nvidia-smi),
     and a request answered after each wake;
  4. --load-format runai_streamer from the same folder, if vLLM has the
     streamer installed (the result says if not).
Writes coldstart.json and coldstart.md to --out (the simulator's stages in
bench/coldstart_bench.py take their "measured" numbers from here). Each
command stays under the device's 10-minute limit; results are written after
every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

PORT = 8000
START_TIMEOUT = 420.0
LOG_LINES = {
    "weights_s": r"Loading weights took ([\d.]+) seconds",
    "model_loading_s": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "compile_s": r"torch\.compile takes ([\d.]+) s in total",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) seconds",
}


# Weights ----------------------------------------------------------------------------------


def write_weights(model: pathlib.Path, shards: int) -> dict:
    """Random bf16 weights of the config's shapes, as sharded safetensors with an index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = sum(_numel(s) for s in shapes.values())
    per_shard = total / shards
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += _numel(shape)
    weight_map = {}
    started = time.monotonic()
    generator = torch.Generator(device=device).manual_seed(0)
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: (torch.randn(shapes[n], generator=generator, device=device, dtype=torch.float32) * 0.02)
            .to(torch.bfloat16)
            .cpu()
            for n in names
        }
        save_file(tensors, str(model / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del tensors
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    written = {"bytes": total * 2, "files": len(groups), "write_s": round(time.monotonic() - started, 1)}
    print(json.dumps(written), flush=True)
    return written


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


# One server -------------------------------------------------------------------------------


def http(method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def gpu_memory_mib() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class Server:
    def __init__(self, model: pathlib.Path, log: pathlib.Path, cache_root: pathlib.Path, extra: list[str], env: dict):
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--served-model-name"]
        command += ["l8b", "--port", str(PORT), "--dtype", "bfloat16", "--max-model-len", "8192"]
        command += ["--gpu-memory-utilization", "0.9", "--no-enable-prefix-caching", *extra]
        self.command = command
        self.log = log
        environment = {**os.environ, "VLLM_CACHE_ROOT": str(cache_root), **env}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )

    def wait_ready(self) -> float:
        while time.monotonic() - self.started < START_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; see {self.log}")
            try:
                if http("GET", "/health", timeout=2)[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"vllm serve was not ready within {START_TIMEOUT:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_numbers(self) -> dict:
        text = self.log.read_text(errors="replace")
        found = {}
        for key, pattern in LOG_LINES.items():
            match = re.search(pattern, text)
            found[key] = float(match.group(1)) if match else None
        return found


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be emptied (root only), so the
    next start reads the weights from the disk rather than from memory."""
    try:
        os.sync()
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def answer() -> bool:
    status, body = http("POST", "/v1/completions", {"model": "l8b", "prompt": [1000] * 64, "max_tokens": 8})
    return status == 200 and b'"choices"' in body


def start_and_measure(name: str, model, out, cache_root, extra=(), env=None, during=None) -> dict:
    print(f"== {name}", flush=True)
    server = Server(model, out / f"{name}.log", cache_root, list(extra), env or {})
    result: dict = {"name": name, "command": server.command[3:], "env": env or {}}
    try:
        result["ready_s"] = round(server.wait_ready(), 1)
        result["answers"] = answer()
        result |= server.log_numbers()
        result["gpu_memory_mib"] = gpu_memory_mib()
        if during is not None:
            result |= during()
    except RuntimeError as error:
        result["error"] = str(error)
        result["log_tail"] = server.log.read_text(errors="replace")[-2000:]
    finally:
        server.stop()
    print(json.dumps(result), flush=True)
    return result


def sleep_wake_cycles(cycles: int):
    def run() -> dict:
        rounds = []
        for _ in range(cycles):
            started = time.monotonic()
            slept = http("POST", "/sleep?level=1")[0]
            sleep_s = time.monotonic() - started
            asleep = json.loads(http("GET", "/is_sleeping")[1] or b"{}").get("is_sleeping")
            memory_asleep = gpu_memory_mib()
            started = time.monotonic()
            woke = http("POST", "/wake_up")[0]
            wake_s = time.monotonic() - started
            started = time.monotonic()
            answered = answer()
            first_answer_s = time.monotonic() - started
            rounds.append(
                {
                    "sleep_status": slept,
                    "sleep_s": round(sleep_s, 2),
                    "is_sleeping": asleep,
                    "gpu_memory_asleep_mib": memory_asleep,
                    "wake_status": woke,
                    "wake_s": round(wake_s, 3),
                    "answered_after_wake": answered,
                    "first_answer_after_wake_s": round(first_answer_s, 3),
                    "gpu_memory_awake_mib": gpu_memory_mib(),
                }
            )
        return {"sleep_wake": rounds}

    return run


def markdown(results: list[dict], weights: dict | None) -> str:
    lines = [
        "| start | to /health 200 | weights (vLLM's log) | model loading | torch.compile | engine init | answers |"
    ]
    lines.append("|---|---|---|---|---|---|---|")

    def cell(value, unit=" s"):
        return "–" if value is None else f"{value:g}{unit}"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['ready_s']} s | {cell(r.get('weights_s'))} | {cell(r.get('model_loading_s'))} "
            f"| {cell(r.get('compile_s'))} | {cell(r.get('engine_init_s'))} | {r.get('answers')} |"
        )
    rounds = [c for r in results for c in r.get("sleep_wake", [])]
    if rounds:
        lines += ["", "| cycle | sleep | GPU memory asleep | wake | first answer after wake | GPU memory awake |"]
        lines.append("|---|---|---|---|---|---|")
        for number, c in enumerate(rounds, start=1):
            lines.append(
                f"| {number} | {c['sleep_s']} s ({c['sleep_status']}) | {c['gpu_memory_asleep_mib']} MiB "
                f"| {c['wake_s']} s ({c['wake_status']}) | {c['first_answer_after_wake_s']} s "
                f"({c['answered_after_wake']}) | {c['gpu_memory_awake_mib']} MiB |"
            )
    if weights:
        lines += ["", f"weights on disk: {weights['bytes'] / 1e9:.1f} GB in {weights['files']} files"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    weights = sub.add_parser("weights", help="write random bf16 safetensors of the model's shapes")
    weights.add_argument("--model", type=pathlib.Path, required=True)
    weights.add_argument("--shards", type=int, default=4)
    measure = sub.add_parser("measure", help="start vLLM from disk, with the compile cache, sleep and wake")
    measure.add_argument("--model", type=pathlib.Path, required=True)
    measure.add_argument("--out", type=pathlib.Path, required=True)
    measure.add_argument("--cycles", type=int, default=3)
    measure.add_argument(
        "--steps", default="first,compiled,sleep,streamer", help="comma-separated, of first,compiled,sleep,streamer"
    )
    measure.add_argument(
        "--keep-cache", action="store_true", help="keep the compile cache of an earlier run (else emptied first)"
    )
    args = parser.parse_args()
    if args.command == "weights":
        written = write_weights(args.model, args.shards)
        (args.model / "spotrag-weights.json").write_text(json.dumps(written))
        return 0
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    steps = set(filter(None, args.steps.split(",")))
    # vLLM's compile cache as the node cache keeps it: empty before the first start.
    cache_root = pathlib.Path("/tmp/spotrag-vllm-cache-root")
    if not args.keep_cache:
        shutil.rmtree(cache_root, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    weights_file = args.model / "spotrag-weights.json"
    written = json.loads(weights_file.read_text()) if weights_file.exists() else None
    results: list[dict] = []

    def save() -> None:
        (out / "coldstart.json").write_text(json.dumps({"weights": written, "results": results}, indent=1))
        (out / "coldstart.md").write_text(markdown(results, written))

    if "first" in steps:
        dropped = drop_page_cache()
        results.append(start_and_measure("first start, weights from disk", args.model, out, cache_root))
        results[-1]["page_cache_dropped"] = dropped  # False: the weights may be read from memory, not the disk
        save()
    if "compiled" in steps:
        results.append(start_and_measure("again, compile cache kept", args.model, out, cache_root))
        save()
    if "sleep" in steps:
        results.append(
            start_and_measure(
                "sleep mode",
                args.model,
                out,
                cache_root,
                extra=["--enable-sleep-mode"],
                env={"VLLM_SERVER_DEV_MODE": "1"},
                during=sleep_wake_cycles(args.cycles),
            )
        )
        save()
    if "streamer" in steps:
        results.append(
            start_and_measure(
                "runai_streamer from disk", args.model, out, cache_root, extra=["--load-format", "runai_streamer"]
            )
        )
        save()
    print(markdown(results, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
