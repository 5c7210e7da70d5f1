# syntax=docker/dockerfile:1
# The cleanplate gateway: `cleanplate serve` on 0.0.0.0:8080 with the default bundle inside.
#   docker build -t cleanplate/gateway:0.1.0 .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp cleanplate/gateway:0.1.0
# The torch engine on a GPU needs PyTorch's CUDA build: pass its wheel index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (a gateway in front of Triton, CLEANPLATE_ENGINE=triton, needs no GPU and keeps the CPU build).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with cleanplate and its pinned torch ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch alone first, from its own index: the default index's torch would bring the CUDA stack along.
RUN python -m venv /opt/cleanplate \
 && /opt/cleanplate/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cleanplate ./cleanplate
COPY serving ./serving
COPY export ./export
COPY training ./training
COPY benchmarks ./benchmarks
# Not editable: the image must not depend on /src. pip compiles the .pyc files here, so a read-only
# root filesystem costs nothing at run time. The last command fails the build if the bundle is missing.
# Extras: serve (the gateway) and export (the onnxruntime and triton engines); no trainers, plots or Helm.
# The image of the chart's RayJob (a Ray cluster's nodes) adds kuberay: --build-arg EXTRAS=serve,export,kuberay
ARG EXTRAS=serve,export
RUN /opt/cleanplate/bin/pip install --no-cache-dir ".[${EXTRAS}]" \
 && /opt/cleanplate/bin/cleanplate bundle info > /dev/null

# ---- gateway: no compiler, no pip cache, no sources; a non-root user ---------------------------------
FROM ${PYTHON_IMAGE} AS gateway
ARG UID=10001
RUN groupadd --system --gid "${UID}" cleanplate \
 && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cleanplate
COPY --from=build /opt/cleanplate /opt/cleanplate
COPY docker/entrypoint.sh /usr/local/bin/cleanplate-entrypoint
# Everything the process may write goes to /tmp (mount a tmpfs/emptyDir there with a read-only root).
ENV PATH=/opt/cleanplate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    CLEANPLATE_HOST=0.0.0.0 \
    CLEANPLATE_PORT=8080
USER ${UID}:${UID}
WORKDIR /tmp
EXPOSE 8080
# /healthz answers as soon as the process serves (the model may still be loading: /readyz tells that).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CLEANPLATE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/cleanplate-entrypoint"]
CMD ["serve"]
