# syntax=docker/dockerfile:1
# The runtime image: the RAG gateway and the index Job on CPU nodes
# (sentence-transformers on the CPU build of torch, faiss-cpu, FastAPI).
#
#   docker build -f images/runtime.Dockerfile -t ghcr.io/spotrag/runtime:0.1.0 .
#
# The operator names this image in every gateway and CPU index Job
# (RAGDeployment spec.gateway.image); the pods run as uid 10001 with a
# read-only root filesystem, so nothing here may need to write outside /tmp
# and the HF_HOME cache the operator mounts.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The CPU build of torch first, or sentence-transformers pulls a CUDA build
# several GB large that a CPU gateway never uses.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/spotrag \
    && /opt/spotrag/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY operator/ operator/
COPY runtime/ runtime/
COPY simulator/ simulator/
COPY box/ box/
RUN /opt/spotrag/bin/pip install --no-cache-dir ".[runtime]" \
    && /opt/spotrag/bin/python -c "import torch, faiss, fastapi, sentence_transformers; assert not torch.version.cuda"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 spotrag \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin spotrag
COPY --from=build /opt/spotrag /opt/spotrag
ENV PATH=/opt/spotrag/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/var/cache/spotrag \
    OMP_NUM_THREADS=1
USER 10001:10001
# The gateway's OpenAI-compatible API and /metrics.
EXPOSE 8080
ENTRYPOINT ["spotrag"]
CMD ["--help"]
