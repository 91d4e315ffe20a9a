# syntax=docker/dockerfile:1
# The operator image, also used by the node agent: kopf, the Kubernetes
# client, prometheus-client, httpx, pyyaml. No torch, no faiss.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/spotrag/operator:0.1.0 .
#
# Build from the repository root: the operator reads its CRD from crds/
# (operator/spotrag_operator/crd.yaml is a link to it).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY operator/ operator/
COPY runtime/ runtime/
COPY simulator/ simulator/
COPY box/ box/
# The base dependencies only: what `spotrag operator` and `spotrag node-agent` import.
RUN python -m venv /opt/spotrag \
    && /opt/spotrag/bin/pip install --no-cache-dir . \
    && /opt/spotrag/bin/python -c "import kopf, kubernetes, spotrag_operator.crd as crd; crd.load_crd()"

FROM ${PYTHON_IMAGE}
# A named user so that tools asking for the user name (getpass) find one.
RUN groupadd --gid 10001 spotrag \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin spotrag
COPY --from=build /opt/spotrag /opt/spotrag
ENV PATH=/opt/spotrag/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
# kopf's liveness endpoint (/healthz).
EXPOSE 8081
ENTRYPOINT ["spotrag"]
CMD ["operator"]
