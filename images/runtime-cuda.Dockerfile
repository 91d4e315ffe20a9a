# syntax=docker/dockerfile:1
# The runtime image for the index Job on a GPU node (corpus.gpu: true):
# embeddings on CUDA torch and faiss-gpu. The operator derives its name from
# the runtime image's (".../runtime:TAG" becomes ".../runtime-cuda:TAG").
#
#   docker build -f images/runtime-cuda.Dockerfile -t ghcr.io/spotrag/runtime-cuda:0.1.0 .
#
# No CUDA base image: torch's and faiss-gpu's wheels carry the CUDA libraries
# they need, and the NVIDIA container runtime mounts the node's driver into
# any container that the device plugin gives a GPU.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch from PyPI is the CUDA build on x86_64.
RUN python -m venv /opt/spotrag \
    && /opt/spotrag/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY operator/ operator/
COPY runtime/ runtime/
COPY simulator/ simulator/
COPY box/ box/
# The runtime extra brings faiss-cpu, which installs the same "faiss" module
# as faiss-gpu: remove it, then reinstall faiss-gpu over the files it shared.
RUN /opt/spotrag/bin/pip install --no-cache-dir ".[runtime,gpu]" \
    && /opt/spotrag/bin/pip uninstall --yes faiss-cpu \
    && /opt/spotrag/bin/pip install --no-cache-dir --no-deps --force-reinstall "faiss-gpu==$(/opt/spotrag/bin/python -c 'import importlib.metadata as m; print(m.version("faiss-gpu"))')" \
    && /opt/spotrag/bin/python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'faiss without GPU support'"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 spotrag \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin spotrag
COPY --from=build /opt/spotrag /opt/spotrag
# Only the driver capabilities; which GPUs a container sees is the device
# plugin's decision (never NVIDIA_VISIBLE_DEVICES=all in an image).
ENV PATH=/opt/spotrag/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/var/cache/spotrag \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["spotrag"]
CMD ["--help"]
