# odoo-replicator: build the Cython extensions in one stage, run in a slim one.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libpq-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY replicator ./replicator
# Every version pinned, the build's own (setuptools, Cython) included: PIP_CONSTRAINT
# reaches pip's isolated build environment too.
ENV PIP_CONSTRAINT=/src/constraints.txt
RUN pip wheel --no-cache-dir --wheel-dir /wheels . && cp constraints.txt /wheels/

FROM python:3.11-slim-bookworm
# libpq5: psycopg (pure Python) and the extensions share the system libpq.
# curl: the compose file's health check (GET /health).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /app --shell /usr/sbin/nologin replicator \
    && mkdir -p /app/data && chown replicator: /app/data
COPY --from=build /wheels /wheels
# Only the wheels built and pinned above: nothing fetched at this stage.
RUN pip install --no-cache-dir --no-index -c /wheels/constraints.txt /wheels/*.whl \
    && rm -rf /wheels
WORKDIR /app
# Spill files of transactions bigger than max_memory_mb go here: docker-compose.yml mounts the
# etl-data volume on it (a new named volume takes this directory's owner) instead of the
# container's writable layer.
ENV TMPDIR=/app/data
USER replicator
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD curl -fsS http://localhost:9090/health || exit 1
ENTRYPOINT ["replicator"]
# Every interface of the container, for Prometheus on the compose network: the port is
# published on the host's loopback only (docker-compose.yml).
CMD ["run", "--config", "/app/config.toml", "--metrics-host", "0.0.0.0"]
