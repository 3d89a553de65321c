# eventsync: reads the active events from DynamoDB and publishes one retained
# MQTT message per target over mutual TLS.
#
#   docker build -t eventsync .
#   docker run --rm -v "$PWD/config.toml:/etc/eventsync/config.toml:ro" \
#       -v "$PWD/certificates:/etc/eventsync/certificates:ro" eventsync
#
# The working directory /etc/eventsync is where the daemon looks for
# config.toml, and relative paths in that file resolve against it, so the
# shipped config.toml finds certificates/ca.crt at
# /etc/eventsync/certificates/ca.crt. Without a config file, every setting
# comes from EVENTSYNC_<SECTION>__<KEY> variables. docs/container.md describes
# the compose stack and an ECS deployment.

# Any image with Python 3.11 or newer, `python` on PATH, the venv module,
# groupadd and useradd.
# CI builds from a Debian stand-in because it cannot pull from Docker Hub.
ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS build

# Marks the untagged build-stage images that Docker's legacy builder keeps, so
# that ci/container-test can prune the outdated ones.
LABEL io.eventsync.stage=build

# pip compiles the bytecode at install time, because the non-root user cannot
# write __pycache__ folders under /opt/venv at run time.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

# The dependencies come only from the lock, and pip checks every file against
# its hash. --no-deps keeps pip from adding anything the lock does not list.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.lock

# The package goes in after its dependencies so that a code change reuses the
# dependency layer. pip builds its wheel in an isolated build environment that
# does not end up in the image. NOTE: pip fetches setuptools for that build
# environment from the index without a hash check. `pip check` fails the build
# when the lock no longer satisfies pyproject.toml's dependencies.
COPY pyproject.toml README.md /src/
COPY eventsync /src/eventsync
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools


FROM ${BASE_IMAGE}

# A fixed UID and GID, so that files mounted from the host or from a volume
# can be given to this user (chown 10001) ahead of time.
RUN groupadd --gid 10001 eventsync \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin eventsync

COPY --from=build /opt/venv /opt/venv

# The heartbeat file is set here rather than left to config.toml because the
# HEALTHCHECK below depends on it; an environment variable overrides the file.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EVENTSYNC_HEALTH__HEARTBEAT_FILE=/tmp/eventsync.heartbeat

WORKDIR /etc/eventsync
USER 10001:10001

# `eventsync health` without --max-age allows two sync periods plus 300 s,
# computed from the configured schedule (interval or cron). The start period
# covers start-up and the first sync.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["eventsync", "health"]

# The daemon finishes the running sync (sync.shutdown_timeout, 20 s by
# default) and disconnects on SIGTERM, so give it 30 s before SIGKILL
# (`docker stop -t 30`, compose stop_grace_period, ECS stopTimeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["eventsync"]
CMD ["run"]
