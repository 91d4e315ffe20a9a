"""How fast a real vLLM engine comes up: weights from local disk, and sleep mode (issue 18).

    # on the GPU machine, vLLM 0.26.0 from ../shared/vllm, /tmp/l8b from make_model.py --shape llama-8b:
    python3 bench/vllm_coldstart.py weights --model /tmp/l8b        # random bf16 weights on disk (16 GB)
    python3 bench/vllm_coldstart.py start --model /tmp/l8b --out $OUT --label disk
    python3 bench/vllm_coldstart.py start --model /tmp/l8b --out $OUT --label sleep --sleep-mode --cycles 3
    # what the node model cache keeps: the same compile cache twice (the second start reuses it)
    python3 bench/vllm_coldstart.py start --model /tmp/l8b --out $OUT --label compile-1 --cache-root /tmp/vc
    python3 bench/vllm_coldstart.py start --model /tmp/l8b --out $OUT --label compile-2 --cache-root /tmp/vc
    # the Run:ai streamer from the same folder (needs runai-model-streamer in the pack)
    python3 bench/vllm_coldstart.py start --model /tmp/l8b --out $OUT --label streamer --load-format runai_streamer

`start` serves the model as an engine would (weights read from the folder,
bf16, TP 1), reports seconds to /health 200 and vLLM's own phase timings from
its log; with --sleep-mode it also puts the engine to sleep (level 1: weights
offloaded to CPU, KV cache dropped) and wakes it, `--cycles` times, with the
GPU memory held while asleep, and checks it answers after each wake.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

PORT = 8000
# vLLM's log lines for each phase of a start, and what they measure.
PHASES = {
    "weights_load_s": r"Loading weights took ([\d.]+) seconds",
    "model_load_s": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "torch_compile_s": r"torch\.compile took ([\d.]+) s in total",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def write_weights(model: pathlib.Path) -> None:
    """Random bf16 weights in the model's shapes, in four safetensors shards."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    names = list(shapes)
    shards = [names[i::4] for i in range(4)]
    weight_map, total = {}, 0
    started = time.monotonic()
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-00004.safetensors"
        tensors = {}
        for name in shard:
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16, device="cuda")
            if len(shapes[name]) > 1:
                tensor.normal_(0, 0.02)
            else:
                tensor.fill_(1.0)  # a norm's scale
            tensors[name] = tensor.cpu()
            weight_map[name] = filename
            total += tensor.numel() * 2
        save_file(tensors, str(model / filename), metadata={"format": "pt"})
    index_body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index_body))
    print(f"wrote {total / 2**30:.1f} GiB of weights in {time.monotonic() - started:.1f} s", flush=True)


def get(path: str, method: str = "GET", body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def gpu_memory_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    return int(out.stdout.split()[0])


def answers() -> bool:
    body = {"model": "l8b", "prompt": "The fleet", "max_tokens": 8, "temperature": 0}
    status, _ = get("/v1/completions", "POST", body)
    return status == 200


def start(args: argparse.Namespace) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"coldstart-{args.label}-server.log"
    env = dict(os.environ)
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--served-model-name", "l8b"]
    command += ["--port", str(PORT), "--dtype", "bfloat16", "--max-model-len", "16384"]
    command += ["--gpu-memory-utilization", "0.9", "--no-enable-prefix-caching"]
    if args.sleep_mode:
        command.append("--enable-sleep-mode")
        env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep, /wake_up and /is_sleeping
    if args.load_format:
        command += ["--load-format", args.load_format]
    if args.cache_root:
        env["VLLM_CACHE_ROOT"] = args.cache_root  # what spotrag's node model cache keeps
    result: dict = {"label": args.label, "command": command[3:]}
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"vllm serve exited with {process.returncode}")
            try:
                if get("/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.25)
        result["start_to_health_s"] = time.monotonic() - started
        log_text = log_path.read_text()
        for phase, pattern in PHASES.items():
            match = re.search(pattern, log_text)
            result[phase] = float(match.group(1)) if match else None
        result["answers"] = answers()
        result["gpu_memory_awake_mib"] = gpu_memory_mib()
        cycles = []
        for _ in range(args.cycles if args.sleep_mode else 0):
            cycle: dict = {}
            t = time.monotonic()
            cycle["sleep_status"] = get("/sleep?level=1", "POST", timeout=120)[0]
            cycle["sleep_s"] = time.monotonic() - t
            cycle["gpu_memory_asleep_mib"] = gpu_memory_mib()
            t = time.monotonic()
            cycle["wake_status"] = get("/wake_up", "POST", timeout=120)[0]
            cycle["wake_s"] = time.monotonic() - t
            t = time.monotonic()
            cycle["answers_after_wake"] = answers()
            cycle["first_answer_after_wake_s"] = time.monotonic() - t
            cycles.append(cycle)
            print(json.dumps(cycle), flush=True)
        result["sleep_wake_cycles"] = cycles
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    print(json.dumps(result, indent=1), flush=True)
    (out / f"coldstart-{args.label}.json").write_text(json.dumps(result, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="write random bf16 weights into the model folder")
    weights.add_argument("--model", required=True)
    serve = commands.add_parser("start", help="start the engine and time it (and sleep/wake it)")
    serve.add_argument("--model", required=True)
    serve.add_argument("--out", required=True)
    serve.add_argument("--label", required=True)
    serve.add_argument("--sleep-mode", action="store_true")
    serve.add_argument("--cycles", type=int, default=3)
    serve.add_argument(
        "--load-format", help="vLLM's --load-format, e.g. runai_streamer (the streamer must be installed)"
    )
    serve.add_argument(
        "--cache-root", help="VLLM_CACHE_ROOT (torch.compile's cache): the same folder twice measures a kept cache"
    )
    args = parser.parse_args()
    if args.command == "weights":
        write_weights(pathlib.Path(args.model))
    else:
        start(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
