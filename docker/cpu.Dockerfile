# Image of the gateway, the scheduler and the `helm test` pod: CPU only, Python 3.11, the pinned pyproject.
# It installs what `make install` installs, in the same order (torch by exact version, the package, then the
# generated gRPC code), without the test extra. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t instgenie:0.1.0 .
# A plain `pip install torch` on Linux takes the CUDA build; pass an index serving CPU-only torch wheels with
#   --build-arg TORCH_INDEX_URL=<index>   for a smaller image (same version).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

# The Makefile's offline switches: models load from local directories only, never from a hub.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY engine engine
COPY services services
COPY instgenie instgenie

# Editable, like `make install`: the generated code lands in /app/instgenie, where protogen writes it.
RUN python -m venv /opt/venv \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && pip install -e . \
 && python -m instgenie.services.common.protogen \
 && python -m compileall -q /app \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp instgenie

# The chart runs every pod as this uid on a read-only root filesystem (values.yaml podSecurityContext).
USER 10001
EXPOSE 50051 50052
CMD ["python", "-m", "instgenie.services.gateway"]
