# contact-worker: one process, the SQLite spool with HTTP ingest on a volume by default.
# Build: docker build -t contact-worker .   (docs/operations.md: "The image")

# Both stages start from the same image: the venv built in the first one points at its Python.
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the locked dependencies and the project's wheel, into /opt/venv ---
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Build tools, hash-checked like everything else that comes from the package index.
COPY requirements-build.lock ./
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps \
        -r requirements-build.lock

# The dependencies first, from the lock alone: this layer stays cached while only code changes.
COPY requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock

# The project itself, as a wheel, installed without resolving anything more.
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/contact_worker-*.whl \
    && /opt/venv/bin/pip check

# --- runtime: the venv, a non-root user and the spool volume; no compiler, no build tools ---
FROM ${PYTHON_IMAGE}

RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin worker \
    && mkdir /data \
    && chown worker:worker /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WORKER_SOURCE=sqlite:/data/spool.db \
    WORKER_HTTP_PORT=9102 \
    WORKER_LOG_FORMAT=json

VOLUME /data
WORKDIR /data
USER 10001:10001
EXPOSE 9102

# No curl in a slim image: the venv's Python asks /healthz on the port the worker serves.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_HTTP_PORT', '9102'), timeout=4).close()"]

# Exec form: the worker is PID 1 and gets SIGTERM itself, then drains within --drain-timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["contact-worker", "run"]
