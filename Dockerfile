# The exporter with its test dependencies: used by `docker compose --profile test run --rm
# tests` to run the InfluxDB integration suite against the compose `influxdb` service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 exporter
WORKDIR /app
RUN chown exporter:exporter /app

COPY --chown=exporter:exporter pyproject.toml README.md ./
COPY --chown=exporter:exporter exporter ./exporter
RUN pip install '.[test]'
COPY --chown=exporter:exporter tests ./tests

USER exporter
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-m", "needs_influxdb", "tests/test_influx_integration.py"]
