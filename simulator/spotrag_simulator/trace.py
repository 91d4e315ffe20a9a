"""Request traces: load one (JSONL or CSV) or generate one (diurnal, bursty,
conversation, code).

A trace row is one request: `arrival` (seconds from the start of the trace),
`prompt_tokens` and `output_tokens`. JSONL rows are objects with those keys;
CSV files have a header row naming them. Extra columns are ignored. A bad row
is refused with its line number and what is wrong with it.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from dataclasses import dataclass

import numpy as np

FIELDS = ("arrival", "prompt_tokens", "output_tokens")
GENERATORS = ("diurnal", "bursty", "conversation", "code")

# Shape of a RAG request (system prompt + top-k passages + question in, a
# cited answer out): log-normal, clipped.
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 1400, 0.35, (200, 6000)
OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_RANGE = 180, 0.6, (8, 1500)


@dataclass(frozen=True)
class Shape:
    """A traffic shape: log-normal lengths (median, sigma, clip) and minute-level bursts."""

    prompt: tuple[float, float, tuple[int, int]]
    output: tuple[float, float, tuple[int, int]]
    minute_sigma: float  # each minute's rate is multiplied by a log-normal of this sigma
    bursts_per_hour: float
    burst_minutes: tuple[int, int]
    burst_multiplier: tuple[float, float]
    source: str


# Shapes of two public production traces the issue measured (not shipped with
# the project): the generated lengths follow their percentiles, the minute
# rates their spread (conversation: 0-507 requests a minute, median 326;
# code: up to 632). Sigmas from p50 and p90; the clip holds p99 near theirs.
SHAPES = {
    "conversation": Shape(
        prompt=(1020, 0.77, (16, 4500)),  # p50 1,020 / p90 2,731 / p99 4,142
        output=(129, 0.93, (1, 700)),  # p50 129 / p90 424 / p99 601
        minute_sigma=0.15,
        bursts_per_hour=2.0,
        burst_minutes=(1, 4),
        burst_multiplier=(1.2, 1.6),
        source="a production conversation trace's percentiles (issue 12)",
    ),
    "code": Shape(
        prompt=(1469, 0.98, (16, 7800)),  # p50 1,469 / p90 5,186
        output=(13, 1.12, (1, 380)),  # p50 13 / p90 55
        minute_sigma=0.2,
        bursts_per_hour=3.0,
        burst_minutes=(1, 3),
        burst_multiplier=(1.2, 1.6),
        source="a production code-completion trace's percentiles (issue 12)",
    ),
}


class TraceError(ValueError):
    """A trace that cannot be simulated; the message names the row."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    row: int  # line in the source file (1-based), or index for generated traces


def load_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    """Read a .jsonl or .csv trace, sorted by arrival."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        requests = list(_read_jsonl(path))
    elif suffix == ".csv":
        requests = list(_read_csv(path))
    else:
        raise TraceError(f"{path}: a trace must be .jsonl or .csv, not {suffix or 'a file without extension'}")
    if not requests:
        raise TraceError(f"{path}: the trace has no requests")
    return sorted(requests, key=lambda r: (r.arrival, r.row))


def _read_jsonl(path: pathlib.Path):
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TraceError(f"{path} line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise TraceError(
                    f"{path} line {number}: expected an object with {', '.join(FIELDS)}, got {type(row).__name__}"
                )
            yield _request(row, f"{path} line {number}", number)


def _read_csv(path: pathlib.Path):
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [f for f in FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path} line 1: the header must name {', '.join(FIELDS)}; missing {', '.join(missing)}")
        for row in reader:
            yield _request(row, f"{path} line {reader.line_num}", reader.line_num)


def _request(row: dict, where: str, number: int) -> TraceRequest:
    missing = [f for f in FIELDS if row.get(f) in (None, "")]
    if missing:
        raise TraceError(f"{where}: missing {', '.join(missing)}")
    try:
        arrival = float(row["arrival"])
    except (TypeError, ValueError):
        raise TraceError(f"{where}: arrival must be a number of seconds, got {row['arrival']!r}") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise TraceError(f"{where}: arrival must be a finite number of seconds >= 0, got {row['arrival']!r}")
    tokens = []
    for name in ("prompt_tokens", "output_tokens"):
        value = row[name]
        try:
            count = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            count = None
        if count is None or isinstance(value, bool) or count < 1:
            raise TraceError(f"{where}: {name} must be a whole number >= 1, got {value!r}")
        tokens.append(count)
    return TraceRequest(arrival=arrival, prompt_tokens=tokens[0], output_tokens=tokens[1], row=number)


def check_fits(requests: list[TraceRequest], max_model_len: int, source: str = "trace") -> None:
    """vLLM refuses a request longer than the context: so does the simulator, naming the row."""
    for request in requests:
        total = request.prompt_tokens + request.output_tokens
        if total > max_model_len:
            raise TraceError(
                f"{source} row {request.row}: prompt_tokens + output_tokens = {total} exceeds the model's context "
                f"({max_model_len} tokens, model.maxModelLen)"
            )


def diurnal_rate(hour_of_day: np.ndarray) -> np.ndarray:
    """Relative load over a day: quiet at 04:00, busiest mid-afternoon (0.15 .. 1.0)."""
    return 0.15 + 0.85 * (0.5 - 0.5 * np.cos(2 * np.pi * (hour_of_day - 4.0) / 24.0)) ** 1.5


def generate_trace(
    kind: str, *, hours: float, seed: int, peak_rps: float = 2.0, start_hour: float = 0.0
) -> list[TraceRequest]:
    """A synthetic trace: `diurnal` (a smooth day) or `bursty` (the day plus sudden bursts).

    Arrivals are a non-homogeneous Poisson process drawn by thinning; bursts
    arrive about once an hour, multiply the load 2-4x and last 3-12 minutes,
    the shape of a batch job or a launch hitting a RAG service.
    """
    if kind not in GENERATORS:
        raise TraceError(f"unknown trace generator {kind!r} (known: {', '.join(GENERATORS)})")
    if not hours > 0:
        raise TraceError(f"--hours must be positive, got {hours}")
    if not peak_rps > 0:
        raise TraceError(f"the peak request rate must be positive, got {peak_rps}")
    if kind in SHAPES:
        return shaped_trace(SHAPES[kind], hours=hours, seed=seed, peak_rps=peak_rps, start_hour=start_hour)
    rng = np.random.default_rng(seed)
    duration = hours * 3600.0
    bursts: list[tuple[float, float, float]] = []
    if kind == "bursty":
        count = rng.poisson(hours * 1.0)
        starts = np.sort(rng.uniform(0, duration, count))
        bursts = [(float(s), float(s + rng.uniform(180, 720)), float(rng.uniform(2.0, 4.0))) for s in starts]
    ceiling = peak_rps * max([1.0] + [m for _, _, m in bursts])

    # Thinning: candidate arrivals at the ceiling rate, each kept with rate(t)/ceiling.
    candidates = np.cumsum(rng.exponential(1.0 / ceiling, int(duration * ceiling * 1.2) + 100))
    candidates = candidates[candidates < duration]
    rate = peak_rps * diurnal_rate((start_hour + candidates / 3600.0) % 24.0)
    for start, end, multiplier in bursts:
        inside = (candidates >= start) & (candidates < end)
        rate[inside] *= multiplier
    arrivals = candidates[rng.uniform(0, ceiling, candidates.size) < rate]

    prompts = np.clip(
        np.round(rng.lognormal(np.log(PROMPT_MEDIAN), PROMPT_SIGMA, arrivals.size)), *PROMPT_RANGE
    ).astype(int)
    outputs = np.clip(
        np.round(rng.lognormal(np.log(OUTPUT_MEDIAN), OUTPUT_SIGMA, arrivals.size)), *OUTPUT_RANGE
    ).astype(int)
    return [
        TraceRequest(arrival=float(a), prompt_tokens=int(p), output_tokens=int(o), row=i + 1)
        for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))
    ]


def shaped_trace(
    shape: Shape, *, hours: float, seed: int, peak_rps: float, start_hour: float = 0.0
) -> list[TraceRequest]:
    """A day of `shape`: the diurnal curve (peak_rps at the busiest hour, the
    trace starting at `start_hour` of the day), each minute's rate varied
    log-normally, and bursts of a few minutes on top; Poisson arrivals within
    each minute."""
    rng = np.random.default_rng([seed, 11])
    minutes = int(math.ceil(hours * 60))
    start = np.arange(minutes) * 60.0
    rate = peak_rps * diurnal_rate((start_hour + start / 3600.0) % 24.0)
    rate *= rng.lognormal(-(shape.minute_sigma**2) / 2, shape.minute_sigma, minutes)  # mean 1
    for _ in range(rng.poisson(shape.bursts_per_hour * hours)):
        first = int(rng.integers(0, minutes))
        length = int(rng.integers(shape.burst_minutes[0], shape.burst_minutes[1] + 1))
        rate[first : first + length] *= rng.uniform(*shape.burst_multiplier)
    counts = rng.poisson(rate * 60.0)
    duration = hours * 3600.0
    arrivals = np.sort(np.concatenate([s + rng.uniform(0, 60.0, c) for s, c in zip(start, counts, strict=True)]))
    arrivals = arrivals[arrivals < duration]

    def lengths(spec: tuple[float, float, tuple[int, int]]) -> np.ndarray:
        median, sigma, bounds = spec
        return np.clip(np.round(rng.lognormal(np.log(median), sigma, arrivals.size)), *bounds).astype(int)

    prompts, outputs = lengths(shape.prompt), lengths(shape.output)
    return [
        TraceRequest(arrival=float(a), prompt_tokens=int(p), output_tokens=int(o), row=i + 1)
        for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))
    ]


def drop_oversized(requests: list[TraceRequest], max_model_len: int) -> tuple[list[TraceRequest], int]:
    """The requests that fit the context, and how many did not (--drop-oversized)."""
    kept = [r for r in requests if r.prompt_tokens + r.output_tokens <= max_model_len]
    return kept, len(requests) - len(kept)


def write_trace(requests: list[TraceRequest], path: str | pathlib.Path) -> None:
    """Write JSONL, so a generated trace can be replayed or edited."""
    with pathlib.Path(path).open("w", encoding="utf-8") as out:
        for r in requests:
            out.write(
                json.dumps(
                    {"arrival": round(r.arrival, 3), "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}
                )
                + "\n"
            )
