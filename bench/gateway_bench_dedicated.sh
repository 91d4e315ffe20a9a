#!/usr/bin/env bash
# The gateway benchmark on a host with cores to spare (the lent GPU machine:
# 16 cores, its GPU unused), every proxy on the same dedicated cores:
#
#   one core:   spotrag (1 worker) and the Python floor (bench/python_floor_relay.py)
#               against vllm-router on core 0
#   two cores:  spotrag (2 workers) against vllm-router on cores 0-1
#
# engines on cores 2-3 (one each), the load generator in 4 processes on
# cores 4-15. That machine has Python 3.12 but no web stack: the wheels come
# along in a folder (made here with `pip download`, see docs/benchmarks.md)
# and are installed into /tmp. Results (JSON and the printed tables) go to
# $OUT (default /tmp).
#
#   bash bench/gateway_bench_dedicated.sh WHEEL_DIR
set -euo pipefail

wheels=${1:?usage: gateway_bench_dedicated.sh WHEEL_DIR}
out=${OUT:-/tmp}
site=/tmp/gateway-bench-site
python3 -m pip install --quiet --no-index --find-links "$wheels" --target "$site" \
    fastapi starlette uvicorn httptools uvloop aiohttp orjson prometheus-client httpx tenacity pyyaml \
    kubernetes vllm-router
export PYTHONPATH="$site:$PWD/operator:$PWD/runtime:$PWD/simulator:$PWD/box:$PWD"
router=$site/bin/vllm-router

common=(--retrieval-sizes '' --discovery-flips 0 --vllm-router "$router" --concurrency 32,128,512
    --engines 2 --engine-cpus 2-3 --load-cpus 4-15 --load-processes 4)
python3 bench/gateway_bench.py "${common[@]}" --targets direct,spotrag,python-floor,vllm-router-rr --proxy-cpus 0 \
    --out "$out/gateway-1core.json" | tee "$out/gateway-1core.txt"
python3 bench/gateway_bench.py "${common[@]}" --targets spotrag-w2,vllm-router-rr --proxy-cpus 0-1 \
    --out "$out/gateway-2cores.json" | tee "$out/gateway-2cores.txt"
