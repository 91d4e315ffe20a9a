"""Settings of one emulated engine, and the command line that sets them.

Flags are named like ``vllm serve``'s where vLLM has the setting
(``--served-model-name``, ``--max-model-len``, ``--max-num-seqs``,
``--block-size``, ``--num-gpu-blocks-override``, ``--shutdown-timeout``,
``--seed``); the rest describe the emulated hardware.
This module imports only the standard library: ``start_engine_emulator``
uses it to check options without loading the server.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

DEFAULT_MODEL_NAME = "emulated-model"
# The capacity model set from a measured engine: bench/vllm/capacity.json (vLLM 0.26.0
# on one H200, Llama-3.1-8B shapes, bf16, TP 1, 3 repeats; docs/benchmarks.md).
HARDWARE_PRESETS: dict[str, dict[str, float | int]] = {
    "h200-llama-3.1-8b": {
        "ttft_ms": 12.0,  # one 128-token prompt: TTFT 14.5-17 ms, of which 3.2 ms is prefill
        "itl_ms": 4.9,  # inter-token latency p50 of a lone stream
        # 12.7 ms at 128 streams, 21.0 at 256 (model: 12.7, 20.5); over-estimates
        # 32-64 streams (6.8 and 8.8 ms against 5.5 and 6.0 measured): the safe side.
        "itl_growth_per_seq": 0.0125,
        "prefill_tokens_per_s": 40_000.0,  # 37.7k-41.0k tokens/s for 256- to 8,192-token prompts
        "max_num_seqs": 256,
        "block_size": 16,
        "num_gpu_blocks": 56_057,  # 896,912 KV-cache tokens at --gpu-memory-utilization 0.9
        "max_model_len": 16_384,
    },
}
# What GET /version reports: the vLLM release whose API this emulates.
EMULATED_VLLM_VERSION = "0.26.0+spotrag.emulator"


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # An already bound socket to serve on, inherited from a parent process.
    fd: int | None = None
    served_model_name: str = DEFAULT_MODEL_NAME
    max_model_len: int = 8192
    seed: int = 0
    max_num_seqs: int = 64
    block_size: int = 16
    # KV cache capacity in blocks; tokens = num_gpu_blocks * block_size.
    num_gpu_blocks: int = 8192
    # Fixed cost before the first token of a request (scheduling, first pass).
    ttft_ms: float = 20.0
    # Time of one decode step with a single running sequence.
    itl_ms: float = 5.0
    # Each further running sequence makes a decode step this fraction slower.
    itl_growth_per_seq: float = 0.01
    # Prompt processing speed; prefill is serial and stalls decode steps.
    prefill_tokens_per_s: float = 50_000.0
    # Natural answer length in words (where EOS would come), chosen per answer.
    answer_words_min: int = 64
    answer_words_max: int = 192
    # Seconds running requests may finish after SIGTERM; 0 aborts them at once;
    # when it runs out, open streams stall (as vLLM 0.26's do).
    shutdown_timeout: float = 0.0
    # Seconds before the engine is "loaded" (connections are refused until then).
    startup_delay: float = 0.0
    # vLLM's sleep mode (--enable-sleep-mode, with VLLM_SERVER_DEV_MODE=1): POST /sleep?level=1,
    # POST /wake_up, GET /is_sleeping. Times as measured on an H200 with an 8B model (vLLM 0.26.0,
    # bench/vllm/coldstart-*.json): the first sleep 17.2 s (15.6 GiB of weights copied to CPU), later
    # ones 0.43 s; wake 0.80 s (../shared/vllm/README.md: 0.81 s).
    enable_sleep_mode: bool = False
    sleep_seconds: float = 17.2
    resleep_seconds: float = 0.43
    wake_seconds: float = 0.80
    # A wake that fails (a standby that cannot come back: the operator replaces it).
    wake_fails: bool = False
    log_level: str = "warning"

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_model_len", "max_num_seqs", "block_size", "num_gpu_blocks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in (
            "ttft_ms",
            "itl_ms",
            "itl_growth_per_seq",
            "shutdown_timeout",
            "startup_delay",
            "sleep_seconds",
            "resleep_seconds",
            "wake_seconds",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.prefill_tokens_per_s <= 0:
            problems.append("prefill_tokens_per_s must be positive")
        if not 1 <= self.answer_words_min <= self.answer_words_max:
            problems.append("answer words must satisfy 1 <= min <= max")
        if not 0 <= self.port <= 65535:
            problems.append("port must be in 0..65535")
        if not self.served_model_name:
            problems.append("served_model_name must not be empty")
        if self.kv_capacity_tokens < self.max_model_len:
            # vLLM refuses to start in this case too: one long request could never fit.
            problems.append(
                f"KV cache holds {self.kv_capacity_tokens} tokens (num_gpu_blocks * block_size), "
                f"less than max_model_len {self.max_model_len}"
            )
        if problems:
            raise ValueError("invalid engine emulator settings: " + "; ".join(problems))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


def _answer_words(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX words, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = EmulatorConfig()
    parser = argparse.ArgumentParser(
        prog="spotrag engine-emulator",
        description=(
            "Stand-in for the vLLM OpenAI server (`vllm serve`) on machines without a GPU: "
            "the same endpoints, chunk format, errors and metric names, deterministic text "
            "and a capacity model (batch slots, KV blocks, prefill and decode rates)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--hardware",
        choices=sorted(HARDWARE_PRESETS),
        default=None,
        help="set the capacity model from a measured engine; flags given explicitly still win",
    )
    add("--host", default=defaults.host)
    add("--port", type=int, default=defaults.port, help="0 picks a free port (logged at start)")
    add("--fd", type=int, default=None, help="serve on this inherited, bound socket instead")
    add("--served-model-name", default=defaults.served_model_name)
    add("--max-model-len", type=int, default=defaults.max_model_len)
    add("--seed", type=int, default=defaults.seed, help="the text is a pure function of seed and conversation")
    add("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="batch slots; more requests wait")
    add("--block-size", type=int, default=defaults.block_size)
    add(
        "--num-gpu-blocks-override",
        "--num-gpu-blocks",
        dest="num_gpu_blocks",
        type=int,
        default=defaults.num_gpu_blocks,
        help="KV cache blocks; admission and growth need free blocks",
    )
    add("--ttft-ms", type=float, default=defaults.ttft_ms, help="fixed time to first token, before prefill")
    add("--itl-ms", type=float, default=defaults.itl_ms, help="decode step time with one running sequence")
    add(
        "--itl-growth-per-seq",
        type=float,
        default=defaults.itl_growth_per_seq,
        help="fraction a decode step slows per extra running sequence",
    )
    add("--prefill-tokens-per-s", type=float, default=defaults.prefill_tokens_per_s)
    add(
        "--answer-words",
        type=_answer_words,
        default=(defaults.answer_words_min, defaults.answer_words_max),
        metavar="MIN:MAX",
        help="natural answer length in words (EOS point)",
    )
    add(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout,
        help="on SIGTERM, seconds running requests may finish; 0 aborts them; then open streams stall",
    )
    add(
        "--startup-delay",
        type=float,
        default=defaults.startup_delay,
        help="seconds connections are refused (model load)",
    )
    add(
        "--enable-sleep-mode",
        action=argparse.BooleanOptionalAction,
        default=defaults.enable_sleep_mode,
        help="serve /sleep, /wake_up and /is_sleeping (vLLM needs VLLM_SERVER_DEV_MODE=1 too)",
    )
    add("--sleep-seconds", type=float, default=defaults.sleep_seconds, help="time the first POST /sleep takes")
    add("--resleep-seconds", type=float, default=defaults.resleep_seconds, help="time a later POST /sleep takes")
    add("--wake-seconds", type=float, default=defaults.wake_seconds, help="time POST /wake_up takes")
    add(
        "--wake-fails",
        action=argparse.BooleanOptionalAction,
        default=defaults.wake_fails,
        help="POST /wake_up answers 500 (a standby that cannot come back)",
    )
    add("--log-level", default=defaults.log_level, choices=["critical", "error", "warning", "info", "debug"])
    return parser


def parse_arguments(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with a --hardware preset's values as the defaults."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.hardware:
        parser.set_defaults(**HARDWARE_PRESETS[known.hardware])
    return parser, parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    values = {name: value for name, value in vars(args).items() if name not in ("answer_words", "hardware")}
    values["answer_words_min"], values["answer_words_max"] = args.answer_words
    return EmulatorConfig(**values)


def config_arguments(config: EmulatorConfig) -> list[str]:
    """The command line that recreates ``config`` (less where to listen)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        if field.name in ("host", "port", "fd", "answer_words_min", "answer_words_max"):
            continue
        flag = "--num-gpu-blocks" if field.name == "num_gpu_blocks" else "--" + field.name.replace("_", "-")
        value = getattr(config, field.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
            continue
        argv += [flag, str(value)]
    argv += ["--answer-words", f"{config.answer_words_min}:{config.answer_words_max}"]
    return argv
