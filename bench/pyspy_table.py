"""Where the gateway's CPU went, from py-spy recordings (``py-spy record
--format raw``, e.g. those of ``bench/gateway_ab.py --py-spy``): a row per
part of the hot path, as a share of the samples and as microseconds per
answer (the share times the CPU per answer measured under the recording).

    python bench/pyspy_table.py pyspy-A-c32.txt 3.79 pyspy-B-c32.txt 3.46
"""

import re
import sys


def load(path: str) -> list[tuple[list[str], int]]:
    """(frames, outermost first, without line numbers; samples) per line of a raw py-spy recording."""
    stacks = []
    with open(path) as recording:
        for line in recording:
            stack, _, count = line.rstrip().rpartition(" ")
            if stack:
                stacks.append(([re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")], int(count)))
    return stacks


# Rows name a part of the hot path under both relays: the one on aiohttp's
# reads and async generators (up to e49f2e5's parent) and the one driven by the
# engine connection's callbacks (from e49f2e5 on).
ROWS = [
    ("event loop, native (uvloop: polling, socket reads, task steps)", "self", r"^Runner\.run "),
    (
        "writes to clients (uvicorn `RequestResponseCycle.send`, incl. the socket write)",
        "incl",
        r"^RequestResponseCycle\.send ",
    ),
    (
        "Starlette `StreamingResponse` and its anyio task group (own time)",
        "self",
        r"\((starlette/responses\.py|anyio/)",
    ),
    ("send wrappers of the middleware (own time)", "self", r"(_send|sender|send_response) \((starlette|fastapi)/"),
    (
        "the response's own code (`_events`, `ChatStream`, `ClientWriter`; own time)",
        "self",
        r"^(_events|ChatStream\.\w+|ClientWriter\.\w+) ",
    ),
    (
        "taking the engine's chunks: usage, counting, admission (`ChatRelay.chunks` / `_Attempt.events`, "
        "less the stall watch's read and the client write)",
        "incl-minus",
        (r"^(ChatRelay\.chunks|_Attempt\.events) ", r"^(_StallWatch\.next|RequestResponseCycle\.send|ClientWriter\.)"),
    ),
    ("`_StallWatch.next` (incl. the engine read below it)", "incl", r"^_StallWatch\.next "),
    ("`EngineClient.stream_chat` (incl. aiohttp's reads)", "incl", r"^EngineClient\.stream_chat "),
    (
        "reading the engine's stream, less what the relay does with it (aiohttp's or our `data_received`)",
        "incl-minus",
        (r"^(ResponseHandler|_Connection)\.data_received ", r"^_Attempt\.events "),
    ),
    (
        "sending the request to the engine",
        "incl",
        r"^(ClientSession\._request|ClientRequest\.write_bytes|_Connection\.send|EngineClient\._connection) ",
    ),
    ("histogram observations (`Histogram.observe`)", "incl", r"^Histogram\.observe "),
    (
        "per request: FastAPI's handler (dependencies, validation, the route up to the response)",
        "incl",
        r"^get_request_handler\.<locals>\.app ",
    ),
    ("per request: uvicorn's parsing of the request (`HttpToolsProtocol`)", "incl", r"^HttpToolsProtocol\."),
]


def matches(kind: str, pattern: str | tuple[str, str], frames: list[str]) -> bool:
    if kind == "self":
        return re.search(pattern, frames[-1]) is not None
    if kind == "incl":
        return any(re.search(pattern, frame) for frame in frames)
    inside, outside = pattern  # "incl-minus": under the first, not under the second
    return any(re.search(inside, f) for f in frames) and not any(re.search(outside, f) for f in frames)


def rows(path: str, cpu_ms: float) -> tuple[int, list[tuple[str, float, float]]]:
    stacks = load(path)
    total = sum(count for _, count in stacks)
    out = []
    for name, kind, pattern in ROWS:
        samples = sum(count for frames, count in stacks if matches(kind, pattern, frames))
        out.append((name, 100 * samples / total, cpu_ms * 1000 * samples / total))
    return total, out


def main(argv: list[str]) -> None:
    files, cpus = argv[0::2], [float(cpu) for cpu in argv[1::2]]
    results = [rows(path, cpu) for path, cpu in zip(files, cpus, strict=True)]
    print(
        "| | " + " | ".join(f"{path} ({total} samples)" for path, (total, _) in zip(files, results, strict=True)) + " |"
    )
    print("|---|" + "---:|" * len(files))
    print("| CPU per answer | " + " | ".join(f"{cpu:.2f} ms" for cpu in cpus) + " |")
    for i, (name, _, _) in enumerate(results[0][1]):
        print(f"| {name} | " + " | ".join(f"{r[1][i][1]:.1f}% ({r[1][i][2]:.0f} µs)" for r in results) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
