# syntax=docker/dockerfile:1.7
# One image for the whole fleet: `shoal run <gateway|session|eventbus|scheduler|keys>`.
#
#   docker build -t shoal:dev .
#   docker run --rm -p 8470:8470 shoal:dev run gateway
#
# The build stage installs the services' locked runtime closure into /app/.venv (workspace
# members as regular, non-editable installs): the five services and shoal-common, not
# shoal-devtools (`shoal up`, nats-server, PostgreSQL) nor shoal-client. The final stage copies
# only that venv onto the same base, so it has no uv, no compiler and no source tree.

# Both stages must use the same interpreter path: the venv's bin/python points at it.
# Pin a digest in release builds: --build-arg PYTHON_IMAGE=python:3.12-slim@sha256:...
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build

# The uv that wrote uv.lock; newer is fine, older may not read the lock.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

# What the image runs; their dependencies come along (docs/operations.md: the closure's size).
ARG SHOAL_PACKAGES="shoal-gateway shoal-session shoal-eventbus shoal-scheduler shoal-keys"

WORKDIR /src

# Dependencies first, in their own layer: it changes only when uv.lock or a pyproject does.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/client/pyproject.toml libs/client/
COPY libs/devtools/pyproject.toml libs/devtools/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/session/pyproject.toml services/session/
COPY services/eventbus/pyproject.toml services/eventbus/
COPY services/scheduler/pyproject.toml services/scheduler/
COPY services/keys/pyproject.toml services/keys/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-workspace --no-editable \
        $(printf -- '--package %s ' ${SHOAL_PACKAGES})

# Then the workspace's own packages, installed as wheels so /src is not needed at run time.
COPY libs/ libs/
COPY services/ services/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable $(printf -- '--package %s ' ${SHOAL_PACKAGES}) \
 && /app/.venv/bin/shoal --help >/dev/null \
 && ! /app/.venv/bin/python -c 'import shoal.devtools' 2>/dev/null


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="shoal" \
      org.opencontainers.image.description="Shoal: backend for long-lived AI agent sessions (one image, shoal run <service>)"

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it without /etc/passwd.
RUN groupadd --system --gid 10001 shoal \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/shoal --create-home \
        --shell /usr/sbin/nologin shoal

COPY --from=build --chown=0:0 /app/.venv /app/.venv

# Bytecode is compiled at build time; the root filesystem is read-only in Kubernetes.
# Services bind 127.0.0.1 by default; inside a container they must listen on every interface.
ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHOAL_HTTP_HOST=0.0.0.0

WORKDIR /app
USER 10001:10001

# The gateway's public API + WebSockets (every service also serves /healthz, /readyz, /metrics).
EXPOSE 8470
STOPSIGNAL SIGTERM

ENTRYPOINT ["shoal"]
CMD ["run", "gateway"]
