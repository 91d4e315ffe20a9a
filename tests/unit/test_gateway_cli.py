"""`spotrag gateway` as a process: it serves from the command line alone, and
on SIGTERM it stops taking requests but lets the answer in flight finish;
with several worker processes, /metrics is the pod's sum and a client that
goes away frees its engine slot and queued tokens at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading

import httpx
import openai

from spotrag_box.testing import eventually, scrape

from .gateway_fixtures import SERVED_MODEL, direct_answer, running_engines, tokenize_count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_gateway_command_serves_and_drains_on_sigterm(tmp_path) -> None:
    question = [{"role": "user", "content": "Describe the fleet."}]
    with running_engines(1, itl_ms=25, answer_words_min=200, answer_words_max=200) as (engine,):
        port = free_port()
        log = (tmp_path / "gateway.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spotrag_runtime.gateway.cli",
                "--served-model-name",
                SERVED_MODEL,
                "--engine-url",
                engine.url,
                "--no-retrieval",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return process.poll() is not None  # exited: fail below, not by timeout

            eventually(ready, what="the gateway to be ready", timeout=30)
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()
            received: list[str] = []
            finished = threading.Event()

            def stream() -> None:
                with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
                    for chunk in client.chat.completions.create(
                        model=SERVED_MODEL, messages=question, max_tokens=80, stream=True
                    ):
                        if chunk.choices and chunk.choices[0].delta.content:
                            received.append(chunk.choices[0].delta.content)
                finished.set()

            reader = threading.Thread(target=stream)
            reader.start()
            eventually(lambda: len(received) >= 5, what="the answer to start")
            process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:
                    # A poll that connected just as the drain began: uvicorn closes
                    # connections it has not read a request from (and the kernel resets
                    # ones not yet accepted) without an answer. Not refused yet: poll on.
                    # (Raising here once killed the gateway in `finally` and cut the
                    # stream: CI's "incomplete chunked read".)
                    return False
                return False

            eventually(refused, what="the gateway to stop taking connections")
            assert not finished.is_set()  # still streaming when new connections were already refused
            reader.join(timeout=30)
            assert finished.is_set()
            assert "".join(received) == direct_answer(engine, question, max_tokens=80)
            # Drained, then gone: uvicorn re-raises the SIGTERM it caught once it is done.
            assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


def test_several_workers_count_the_pods_queued_tokens_and_free_a_cancelled_stream(tmp_path) -> None:
    questions = [[{"role": "user", "content": "Describe the fleet " + "and its ships " * n}] for n in range(6)]
    with running_engines(1, ttft_ms=1500, itl_ms=200, answer_words_min=300, answer_words_max=300) as (engine,):
        config = tmp_path / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "servedModelName": SERVED_MODEL,
                    "retrieval": {"enabled": False},
                    "engines": {"discovery": "static", "urls": [engine.url]},
                    # Exact before the first token, so the sum can be checked to the token.
                    "admission": {"tokenCounting": "engine", "prefixAffinity": False},
                }
            )
        )
        costs = [tokenize_count(engine, question) + 100 for question in questions]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = (tmp_path / "gateway.log").open("w")
        argv = [sys.executable, "-m", "spotrag_runtime.gateway.cli", "--config", str(config), "--host", "127.0.0.1"]
        process = subprocess.Popen(
            [*argv, "--port", str(port), "--workers", "2", "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        metrics = httpx.Client(timeout=5)
        streams: list[httpx.Client] = []
        leave = threading.Event()
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return process.poll() is not None

            eventually(ready, what="the gateway to be ready", timeout=60)
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()
            answering: list[int] = []

            def ask(question: list[dict], client: httpx.Client) -> None:
                body = {"model": SERVED_MODEL, "messages": question, "max_tokens": 100, "stream": True}
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    if any('"content"' in line for line in response.iter_lines()):
                        answering.append(1)
                        leave.wait(30)  # then the client goes away mid-answer

            for question in questions:
                client = httpx.Client(timeout=30)  # a connection each: the kernel spreads them over the workers
                streams.append(client)
                threading.Thread(target=ask, args=(question, client), daemon=True).start()
            # Waiting for their first token on the engine: the pod's metric is every worker's sum.
            eventually(
                lambda: scrape(f"{url}/metrics", client=metrics).value("spotrag_queued_tokens") == sum(costs),
                what="the pod's queued tokens to be the sum of its requests'",
            )
            eventually(lambda: len(answering) == len(questions), what="every answer to start")
            leave.set()
            eventually(
                lambda: scrape(f"{url}/metrics", client=metrics).value("spotrag_queued_tokens") == 0,
                what="the cancelled requests' tokens to be freed",
            )
            eventually(
                lambda: scrape(f"{engine.url}/metrics").value("vllm:num_requests_running") == 0,
                what="the engine to drop the abandoned requests",
            )
            eventually(
                lambda: (
                    scrape(f"{url}/metrics", client=metrics).value("spotrag_requests_total", outcome="cancelled")
                    == len(questions)
                ),
                what="the cancellations to be counted once each",
            )
        finally:
            leave.set()
            for client in streams:
                client.close()
            metrics.close()
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
