"""A stand-in for the vLLM OpenAI server (``vllm serve``) on machines with no GPU.

It speaks vLLM's protocol (chat and text completions, streamed in vLLM's
chunk format or whole, ``/tokenize``, ``/v1/models``, ``/health``,
``/version``, ``/metrics`` with vLLM's metric names), generates
deterministic text (see ``text``), and has a capacity model (see
``engine``) so queueing and slowdown under load look real. Tests, the
simulated cluster and benchmarks run it as a separate process::

    from spotrag_runtime.engine_emulator import start_engine_emulator

    with start_engine_emulator(served_model_name="m", seed=1) as engine:
        engine.wait_ready()
        ...  # OpenAI client with base_url=engine.url + "/v1"

or from a shell: ``spotrag engine-emulator --port 8000 --served-model-name m``
(also ``python -m spotrag_runtime.engine_emulator``).

Importing this package loads only the standard library; the server's
dependencies (uvicorn, starlette, pydantic, prometheus-client) load in the
child process.
"""

from .config import EmulatorConfig
from .process import EmulatorProcess, EmulatorStartError, start_engine_emulator

__all__ = ["EmulatorConfig", "EmulatorProcess", "EmulatorStartError", "start_engine_emulator"]
