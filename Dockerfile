# The kvstore daemon image. CPU by default; the CUDA variant adds CuPy, kvikio and NIXL:
#   docker build -t kvstore:0.1.0 .
#   docker build -t kvstore:0.1.0-cuda --build-arg VARIANT=cuda .
# It runs as uid 10001 (the Helm chart's securityContext); the daemon's state lives in mounted
# volumes (the NVMe directory, the socket directory), so the root filesystem can be read-only.
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base-cpu
ENV KVSTORE_EXTRAS=s3

FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04 AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV KVSTORE_EXTRAS=s3,gpu,rdma

# hadolint ignore=DL3006
FROM base-${VARIANT}
ENV PATH=/opt/kvstore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRPC_VERBOSITY=ERROR \
    XDG_CACHE_HOME=/var/cache/kvstore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvstore/ kvstore/
COPY tiers/ tiers/
COPY server/ server/
COPY client/ client/
COPY proto/ proto/
COPY bench/ bench/
COPY integrations/ integrations/
RUN python3 -m venv /opt/kvstore \
    && pip install --no-cache-dir "/src[${KVSTORE_EXTRAS}]" \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvstore \
    && install -d -o 10001 -g 10001 -m 0700 /var/cache/kvstore
WORKDIR /
USER 10001:10001
EXPOSE 7070 7071
ENTRYPOINT ["kvstore"]
CMD ["serve", "--host", "0.0.0.0"]
