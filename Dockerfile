# abproxy: the proxy and its CLI. Redis, MLflow, Prometheus and Grafana run beside it
# (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY abproxy ./abproxy
# The mlflow service runs this image with --allowed-hosts, an option since MLflow 3.5.
RUN pip install . "mlflow>=3.5" && useradd --create-home abproxy
COPY config ./config
USER abproxy
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"
CMD ["abproxy", "serve", "--config", "config/abproxy.compose.yaml", "--host", "0.0.0.0", "--port", "8080"]
