"""The demo's clients: the official `openai` package against the gateway,
steady streams from a few threads plus bursts, every outcome counted."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import openai

# Questions a user of the handbook would ask; answers stream back.
STEADY_QUESTIONS = (
    "How long before departure can I cancel my ticket and still get all my money back?",
    "At what wind speed are sailings cancelled?",
    "How many pets can one passenger bring on board?",
    "Where do I report a lost item?",
    "What does the Islander Pass cost?",
)


@dataclasses.dataclass
class Counts:
    served: int = 0
    failed: int = 0
    in_flight: int = 0
    tokens: int = 0


class Traffic:
    """Streams chat completions through the gateway until stopped."""

    def __init__(self, base_url: str, model: str, *, steady_clients: int = 2, max_tokens: int = 64, seed: int = 0):
        self.base_url = base_url
        self.model = model
        self.max_tokens = max_tokens
        self.counts = Counts()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._random = random.Random(seed)
        self._threads: list[threading.Thread] = []
        self._steady_clients = steady_clients

    def client(self) -> openai.OpenAI:
        # No retries of the client's own: a failure the gateway lets through must show.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="demo", max_retries=0, timeout=120)

    def start(self) -> None:
        for index in range(self._steady_clients):
            self._spawn(self._steady, index)

    def burst(self, requests: int, *, max_tokens: int = 192) -> None:
        """`requests` at once, each from its own thread."""
        for index in range(requests):
            self._spawn(self._one_shot, index, max_tokens)

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def snapshot(self) -> Counts:
        with self._lock:
            return dataclasses.replace(self.counts)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="demo-traffic")
        self._threads.append(thread)
        thread.start()

    def _steady(self, index: int) -> None:
        client = self.client()
        while not self._stop.is_set():
            self._ask(client, STEADY_QUESTIONS[(index + self.counts.served) % len(STEADY_QUESTIONS)], self.max_tokens)
            self._stop.wait(self._random.uniform(0.05, 0.3))

    def _one_shot(self, index: int, max_tokens: int) -> None:
        self._ask(self.client(), STEADY_QUESTIONS[index % len(STEADY_QUESTIONS)], max_tokens)

    def _ask(self, client: openai.OpenAI, question: str, max_tokens: int) -> None:
        with self._lock:
            self.counts.in_flight += 1
        tokens = 0
        error = None
        try:
            stream = client.chat.completions.create(
                model=self.model,
                stream=True,
                max_tokens=max_tokens,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": question}],
            )
            text = []
            for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            if not "".join(text):
                error = "an empty answer"
        except openai.OpenAIError as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.counts.in_flight -= 1
            if error is None:
                self.counts.served += 1
                self.counts.tokens += tokens
            else:
                self.counts.failed += 1
                self.failures.append(error)
