"""The engine contract, held against the real vLLM server (issue 17).

Two steps, because the GPU machine has vLLM but not the whole operator stack:

    # here: the operator renders engine pods for example RAGDeployments
    python bench/vllm_contract.py render
    # on the GPU machine (vLLM 0.26.0 from ../shared/vllm; see docs/benchmarks.md):
    python3 bench/vllm_contract.py run --model /tmp/tiny --lora /tmp/tinylora --out $OUT

`run` starts each rendered container's `vllm serve` command line as rendered,
with only the model path and port substituted (and, for the one case that
needs it, a shorter --shutdown-timeout), puts the real spotrag gateway in front
of it on the CPUs, and records every check in contract.json: a failed check is
recorded and the run goes on, so one run says everything it can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RENDERED = ROOT / "bench" / "vllm" / "rendered_engine_pods.json"
MODEL_PLACEHOLDER = "/models/tiny"
LORA_PLACEHOLDER = "/models/tiny-lora"
ENGINE_PORT = 8000
GATEWAY_PORT = 8080
# What the operator, the gateway and the SLO autoscaler read from an engine's /metrics.
READ_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:num_preemptions",
    "vllm:request_success",
    "vllm:cache_config_info",
)


# -- render (here) -------------------------------------------------------------


def render() -> None:
    """Engine pods for the basic example (tiny model substituted) and for one
    with every engine feature the CRD offers turned on."""
    sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime")]
    import yaml

    from spotrag_operator import render as rendering
    from spotrag_operator.crd import defaulted_spec

    basic = yaml.safe_load((ROOT / "examples" / "basic.yaml").read_text())
    basic["metadata"]["uid"] = "contract"
    # The tiny model: its path, and a context it has (4,096 positions).
    basic["spec"]["model"].update(name=MODEL_PLACEHOLDER, maxModelLen=4096)
    features = json.loads(json.dumps(basic))
    features["metadata"]["name"] = "features"
    features["spec"]["model"].update(
        enablePrefixCaching=True,
        speculative={"model": "ngram", "numSpeculativeTokens": 3},
        loraAdapters=[{"name": "tiny-lora", "source": LORA_PLACEHOLDER}],
    )
    pods = {}
    for name, body in (("basic", basic), ("features", features)):
        spec = defaulted_spec(body)
        pod = rendering.engine_pod(body, spec, "spot")
        pods[name] = {
            "served_model_name": rendering.served_model_name(body, spec),
            "container": pod["spec"]["containers"][0],
            "terminationGracePeriodSeconds": pod["spec"]["terminationGracePeriodSeconds"],
        }
    RENDERED.parent.mkdir(parents=True, exist_ok=True)
    RENDERED.write_text(json.dumps(pods, indent=1) + "\n")
    print(f"wrote {RENDERED.relative_to(ROOT)}: {', '.join(pods)}")


# -- run (GPU machine) ---------------------------------------------------------


class Report:
    """Checks as they happen, written after each so a cut run keeps what it saw."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"checks": [], "facts": {}}

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.2f}] {message}"
        print(line, flush=True)
        with (self.out / "contract.log").open("a") as log:
            log.write(line + "\n")

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.data["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        self.log(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(detail, default=str)[:400]}")
        self.save()
        return ok

    def fact(self, name: str, value: Any) -> None:
        self.data["facts"][name] = value
        self.log(f"fact {name} = {json.dumps(value, default=str)[:400]}")
        self.save()

    def save(self) -> None:
        (self.out / "contract.json").write_text(json.dumps(self.data, indent=1, default=str))


def connect_outcome(port: int) -> str:
    """'refused', or the /health status, as kubelet's httpGet probe would see it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = sock.recv(64).decode(errors="replace")
    except ConnectionRefusedError:
        return "refused"
    except OSError as error:
        return f"error {error!r}"
    parts = head.split()
    return parts[1] if len(parts) > 1 else f"no status ({head!r})"


def substituted_command(pod: dict, model: str, lora: str | None, *, shutdown_timeout: int | None = None) -> list[str]:
    container = pod["container"]
    assert container["command"] == ["vllm", "serve"], container["command"]
    args = list(container["args"])
    args = [model if a == MODEL_PLACEHOLDER else a for a in args]
    if lora:
        args = [a.replace(LORA_PLACEHOLDER, lora) for a in args]
    args[args.index("--port") + 1] = str(ENGINE_PORT)
    if shutdown_timeout is not None:
        args[args.index("--shutdown-timeout") + 1] = str(shutdown_timeout)
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args]


class Server:
    def __init__(self, command: list[str], log_path: pathlib.Path) -> None:
        self.log_file = log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, report: Report, label: str, port: int, timeout: float) -> float | None:
        """Seconds to the first /health 200; what every probe before it saw."""
        seen: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            outcome = connect_outcome(port)
            seen[outcome] = seen.get(outcome, 0) + 1
            if outcome == "200":
                ready = time.monotonic() - self.started
                report.fact(f"{label}: probes before ready", seen)
                return ready
            time.sleep(0.2)
        report.fact(f"{label}: probes before ready (never ready)", seen)
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def sse_stream(url: str, body: dict, events: list, read_timeout: float = 120) -> None:
    """POST a streamed chat; append (seconds, data) per SSE event, then ('end', how).
    A read timeout is how this client gives up on a stalled stream (it closes the connection)."""
    import httpx

    started = time.monotonic()
    try:
        with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(read_timeout, connect=5)) as response:
            if response.status_code != 200:
                events.append(("end", f"status {response.status_code}: {response.read()[:300]!r}"))
                return
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic() - started, line[6:]))
        events.append(("end", "eof"))
    except Exception as error:  # every way a stream can end is a finding here
        events.append(("end", repr(error)))


def stream_text(events: list) -> tuple[str, str | None, bool]:
    """Text, the last finish_reason and whether [DONE] came."""
    text, finish, done = [], None, False
    for _, data in events:
        if data == "[DONE]":
            done = True
        elif isinstance(data, str) and data.startswith("{"):
            for choice in json.loads(data).get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(text), finish, done


def scrape(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


def start_gateway(served: str, out: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "spotrag_runtime.gateway.cli", "--served-model-name", served]
    command += ["--engine-url", f"http://127.0.0.1:{ENGINE_PORT}", "--no-retrieval"]
    command += ["--host", "127.0.0.1", "--port", str(GATEWAY_PORT), "--log-level", "warning"]
    return subprocess.Popen(command, stdout=(out / "gateway.log").open("w"), stderr=subprocess.STDOUT, env=env)


def check_basic(report: Report, pod: dict, model: str, out: pathlib.Path) -> None:
    import httpx

    engine, gateway_url = f"http://127.0.0.1:{ENGINE_PORT}", f"http://127.0.0.1:{GATEWAY_PORT}"
    served = pod["served_model_name"]
    command = substituted_command(pod, model, None)
    report.fact("basic: command", command[3:])
    server = Server(command, out / "server-basic.log")
    gateway = None
    try:
        ready = server.wait_ready(report, "basic", ENGINE_PORT, timeout=300)
        report.fact("basic: seconds to /health 200", ready)
        if not report.check("basic: rendered command line serves", ready is not None):
            return
        report.check("basic: no 503 before ready", "503" not in report.data["facts"]["basic: probes before ready"])
        gateway = start_gateway(served, out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and gateway.poll() is None:
            try:
                if httpx.get(f"{gateway_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if not report.check("gateway ready in front of the real engine", gateway.poll() is None):
            return

        messages = [{"role": "user", "content": "Describe the fleet in one sentence, please."}]
        body = {"model": served, "messages": messages, "max_tokens": 48, "temperature": 0}
        whole = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=60)
        report.check("gateway: non-streamed chat", whole.status_code == 200, whole.text[:300])
        answer = whole.json()["choices"][0]["message"]["content"] if whole.status_code == 200 else ""
        usage = whole.json().get("usage") if whole.status_code == 200 else None

        events: list = []
        sse_stream(f"{gateway_url}/v1/chat/completions", body | {"stream": True}, events)
        text, finish, done = stream_text(events)
        report.check("gateway: streamed chat ends with finish_reason and [DONE]", bool(finish) and done, events[-3:])
        report.check("gateway: streamed text equals the non-streamed text (greedy)", text == answer, [text, answer])

        direct = httpx.post(f"{engine}/v1/chat/completions", json=body, timeout=60).json()
        sys.path.insert(0, str(ROOT / "runtime"))
        from spotrag_runtime.gateway.upstream import EngineClient

        async def count() -> int:
            client = EngineClient(connect_timeout=5, read_timeout=30)
            try:
                return await client.count_prompt_tokens(
                    engine, model=served, messages=messages, continue_final_message=False
                )
            finally:
                await client.aclose()

        counted = asyncio.run(count())
        report.check(
            "queued-token accounting: the gateway's prompt count equals the engine's usage",
            counted == direct["usage"]["prompt_tokens"] == (usage or {}).get("prompt_tokens"),
            {"gateway counted": counted, "engine usage": direct["usage"], "via gateway": usage},
        )
        tokenized = httpx.post(f"{engine}/tokenize", json={"model": served, "messages": messages}, timeout=10).json()
        report.check(
            "/tokenize body", set(tokenized) == {"count", "max_model_len", "tokens", "token_strs"}, sorted(tokenized)
        )

        samples = scrape(f"{engine}/metrics")
        names = {name.removesuffix("_total").removesuffix("_count").removesuffix("_sum") for name in samples}
        names |= {name.rsplit("_bucket", 1)[0] for name in samples}
        missing = [m for m in READ_METRICS if m not in names]
        report.check("every metric spotrag reads exists", not missing, {"missing": missing})
        report.fact("kv_cache_usage_perc after requests", samples.get("vllm:kv_cache_usage_perc"))
        gateway_samples = scrape(f"{gateway_url}/metrics")
        report.check(
            "gateway: queued tokens back to 0 when idle",
            gateway_samples.get("spotrag_queued_tokens") == 0,
            {k: v for k, v in gateway_samples.items() if "queued" in k or "inflight" in k},
        )

        # A resumed answer: the first part as an assistant message, continued.
        full = httpx.post(f"{engine}/v1/chat/completions", json=body, timeout=60).json()
        full_text = full["choices"][0]["message"]["content"]
        head = full_text[: len(full_text) // 2]
        resumed = httpx.post(
            f"{engine}/v1/chat/completions",
            json=body
            | {
                "messages": [*messages, {"role": "assistant", "content": head}],
                "continue_final_message": True,
                "add_generation_prompt": False,
                "max_tokens": 24,
            },
            timeout=60,
        )
        tail = resumed.json()["choices"][0]["message"]["content"] if resumed.status_code == 200 else None
        report.check("continue_final_message continues the text", bool(tail), resumed.text[:300])
        report.fact(
            "resumed text equals the uninterrupted answer's rest",
            head + (tail or "") == full_text[: len(head) + len(tail or "")],
        )

        errors = {
            "unknown model": httpx.post(f"{engine}/v1/chat/completions", json=body | {"model": "nope"}),
            "max_tokens too large": httpx.post(f"{engine}/v1/chat/completions", json=body | {"max_tokens": 10**6}),
            "prompt too long, streamed": httpx.post(
                f"{engine}/v1/chat/completions",
                json=body | {"stream": True, "messages": [{"role": "user", "content": "fleet " * 6000}]},
            ),
        }
        report.fact(
            "error shapes", {k: [r.status_code, r.headers.get("content-type"), r.text[:300]] for k, r in errors.items()}
        )

        sigterm_under_load(report, pod, server, gateway_url, served, out, expect="complete")
    finally:
        if gateway is not None:
            gateway.kill()
            gateway.wait()
        server.kill()


def sigterm_under_load(
    report: Report, pod: dict, server: Server, url: str, served: str, out: pathlib.Path, *, expect: str
) -> None:
    """What kubelet does: preStop, SIGTERM, SIGKILL at the end of the grace period."""
    label = f"sigterm ({expect})"
    streams: list[list] = [[] for _ in range(8)]
    body = {
        "model": served,
        "messages": [{"role": "user", "content": "Write a long answer."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    pre_stop = pod["container"]["lifecycle"]["preStop"]["exec"]["command"]
    grace = pod["terminationGracePeriodSeconds"]
    report.log(f"{label}: preStop {pre_stop}")
    subprocess.run(pre_stop, check=True)  # the engine still serves meanwhile
    # A stalled stream is given up 6 s after its last byte, to see whether the server then exits.
    read_timeout = 6 if expect == "stall" else 120
    threads = [
        threading.Thread(target=sse_stream, args=(f"{url}/v1/chat/completions", body, s, read_timeout)) for s in streams
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(len(s) >= 3 for s in streams):
        time.sleep(0.05)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    refused_at = None
    while time.monotonic() - sent < 5 and refused_at is None:
        if connect_outcome(ENGINE_PORT) == "refused":
            refused_at = time.monotonic() - sent
        time.sleep(0.02)
    report.fact(f"{label}: seconds from SIGTERM to refused connections", refused_at)
    exited = clients_gone = None
    while time.monotonic() - sent < grace:
        if server.process.poll() is not None:
            exited = time.monotonic() - sent
            break
        if clients_gone is None and all(s and s[-1][0] == "end" for s in streams):
            clients_gone = time.monotonic() - sent
        time.sleep(0.1)
    report.fact(f"{label}: seconds from SIGTERM to every client gone", clients_gone)
    report.fact(f"{label}: seconds from SIGTERM to exit (grace {grace})", exited)
    report.fact(f"{label}: exit code", server.process.poll())
    finished = [stream_text(s) for s in streams]
    last_bytes = [max((t for t, _ in s if t != "end"), default=None) for s in streams]
    report.fact(
        f"{label}: streams",
        [
            {"chars": len(t), "finish": f, "done": d, "end": s[-1][1] if s and s[-1][0] == "end" else "open"}
            for (t, f, d), s in zip(finished, streams, strict=True)
        ],
    )
    report.fact(f"{label}: seconds of each stream's last byte after its start", last_bytes)
    if expect == "complete":
        report.check(f"{label}: every in-flight stream completed", all(f and d for _, f, d in finished))
        report.check(f"{label}: exited within the grace period", exited is not None)
    else:
        report.check(f"{label}: streams stopped without [DONE]", not any(d for _, _, d in finished))
        report.check(
            f"{label}: the server did not exit while streams were open",
            exited is None or clients_gone is None or exited >= clients_gone,
            {"exit": exited, "clients gone": clients_gone},
        )
    server.kill()
    for thread in threads:
        thread.join(timeout=1)


def check_features(report: Report, pod: dict, model: str, lora: str, out: pathlib.Path) -> None:
    import httpx

    engine = f"http://127.0.0.1:{ENGINE_PORT}"
    served = pod["served_model_name"]
    # The drain that runs out: a stream longer than the shutdown timeout (rendered 60 s).
    command = substituted_command(pod, model, lora, shutdown_timeout=2)
    report.fact("features: command", command[3:])
    server = Server(command, out / "server-features.log")
    try:
        ready = server.wait_ready(report, "features", ENGINE_PORT, timeout=300)
        report.fact("features: seconds to /health 200", ready)
        if not report.check("features: ngram speculation, LoRA and prefix caching flags accepted", ready is not None):
            return
        models = httpx.get(f"{engine}/v1/models", timeout=10).json()["data"]
        report.check("LoRA adapter listed with its parent", any(m.get("parent") for m in models), models)
        body = {"model": "tiny-lora", "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 16}
        report.check(
            "chat with the LoRA adapter",
            httpx.post(f"{engine}/v1/chat/completions", json=body, timeout=60).status_code == 200,
        )
        long_prompt = [{"role": "user", "content": "The same long shared preamble. " * 200}]
        for _ in range(2):
            httpx.post(
                f"{engine}/v1/chat/completions",
                json={"model": served, "messages": long_prompt, "max_tokens": 8},
                timeout=60,
            )
        samples = scrape(f"{engine}/metrics")
        report.check(
            "prefix cache hits counted",
            samples.get("vllm:prefix_cache_hits_total", 0) > 0,
            samples.get("vllm:prefix_cache_hits_total"),
        )
        report.check("speculative decoding metrics exported", any(k.startswith("vllm:spec_decode") for k in samples))
        sigterm_under_load(report, pod, server, engine, served, out, expect="stall")
    finally:
        server.kill()


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    pods = json.loads(RENDERED.read_text())
    check_basic(report, pods["basic"], args.model, out)
    check_features(report, pods["features"], args.model, args.lora, out)
    failed = [c["check"] for c in report.data["checks"] if not c["ok"]]
    report.log(f"{len(report.data['checks']) - len(failed)} passed, {len(failed)} failed: {failed}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("render", help="render the engine pods (here)")
    on_gpu = commands.add_parser("run", help="start each rendered server and check it (GPU machine)")
    on_gpu.add_argument("--model", required=True, help="the tiny model's folder (make_model.py)")
    on_gpu.add_argument("--lora", required=True, help="its LoRA adapter's folder (make_model.py --lora)")
    on_gpu.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "render":
        render()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
