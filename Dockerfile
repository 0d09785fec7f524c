# The exporter image (target `runtime`, the default) and the image that runs the InfluxDB
# integration suite against the compose `influxdb` service (target `tests`).
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 exporter \
    && mkdir -p /data /app \
    && chown exporter:exporter /data /app
WORKDIR /app

# Dependencies first, every file checked against requirements.lock's hashes (regenerate the
# lock with the pip-compile command in README.md), then the package itself without resolving.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY --chown=exporter:exporter pyproject.toml README.md ./
COPY --chown=exporter:exporter exporter ./exporter
RUN pip install --no-deps .

USER exporter
ENV EXPORTER_DATA_DIR=/data \
    EXPORTER_LISTEN=0.0.0.0:9402
VOLUME ["/data"]
EXPOSE 9402
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ['EXPORTER_LISTEN'].rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
CMD ["facilitator-exporter", "serve"]


FROM runtime AS tests
USER root
RUN pip install '.[test]'
COPY --chown=exporter:exporter tests ./tests
USER exporter
HEALTHCHECK NONE
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-m", "needs_influxdb", "tests/test_influx_integration.py", "tests/test_analytics_flux.py", "tests/test_analytics_contract.py", "tests/test_influx_real_engine.py"]
