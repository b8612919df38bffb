# eventrun's image. Build context: the repository root.
#   docker build -t eventrun .
#   docker run -p 8080:8080 --stop-timeout 30 -e EVENTRUN_KAFKA__BOOTSTRAP_SERVERS=... -e EVENTRUN_S3__ENDPOINT_URL=... eventrun
# (--stop-timeout: a stop lets runs finish for shutdown_grace plus kill_grace, 14 s by default,
# past docker's 10 s.)
# compose/docker-compose.yml builds it and mounts compose/eventrun.toml and functions/ over
# the copies made here. To serve your own functions, mount them at /app/functions and a
# manifest at /app/compose/eventrun.toml (or pass --config).

ARG PYTHON_VERSION=3.11

# ---- build: install eventrun and its dependencies into a venv (sources stay in this stage)
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY eventrun/ eventrun/
COPY engine/ engine/
COPY triggers/ triggers/
# tzdata: IANA time zones for timer triggers, whatever the base image ships.
RUN /opt/venv/bin/pip install . tzdata

# ---- runtime
FROM python:${PYTHON_VERSION}-slim
# In a container eventrun must listen on every interface and keep its data on the volume,
# whatever manifest is mounted; `docker run -e` can still override both.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EVENTRUN_SERVER__HOST=0.0.0.0 \
    EVENTRUN_SERVER__DATA_DIR=/var/lib/eventrun

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/eventrun \
        --shell /usr/sbin/nologin eventrun \
 && mkdir -p /var/lib/eventrun \
 && chown eventrun:eventrun /var/lib/eventrun \
 && chmod 700 /var/lib/eventrun

COPY --from=build /opt/venv /opt/venv
# The repository's layout, so the manifest's relative handler paths (../functions/...) hold.
COPY functions/ /app/functions/
COPY compose/eventrun.toml /app/compose/eventrun.toml
# The client commands (`eventrun list`, `eventrun logs ID`) find ./eventrun.toml from here.
WORKDIR /app/compose

USER eventrun
VOLUME ["/var/lib/eventrun"]
EXPOSE 8080

# The slim image has no curl; Python asks GET /healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EVENTRUN_SERVER__PORT', '8080') + '/healthz', timeout=4)"]

CMD ["eventrun", "serve", "--config", "/app/compose/eventrun.toml"]
