# flplatform: applies the migrations and serves the API on port 8000. CPU-only torch keeps the
# image small; constraints.txt pins every other dependency (docs/development.md).
FROM python:3.11-slim

# The state lives in the /data volume, never in /app (read-only for the service user): the
# embedded SQLite database, the model blob store and, when FLP_SECRET_KEY is unset, the generated
# secret.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FLP_DATABASE_URL=sqlite+aiosqlite:////data/flplatform.db \
    FLP_SECRET_FILE=/data/.flplatform-secret \
    FLP_BLOB_DIR=/data/blobs
WORKDIR /app

COPY constraints.txt ./
# torch's CPU wheel alone (its own dependencies come pinned from PyPI with the project below).
RUN pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
COPY migrations ./migrations
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flp \
    && mkdir -p /data && chown flp /data

USER flp
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "flplatform.healthcheck", "serve", "http://127.0.0.1:8000/health"]
# `serve` applies the migrations before it listens. On SQLite nothing else is needed (the secret
# is generated into /data); on PostgreSQL set FLP_DATABASE_URL and FLP_SECRET_KEY (compose.yaml).
# FLP_ADMIN_USERNAME / FLP_ADMIN_EMAIL / FLP_ADMIN_PASSWORD create the first administrator.
CMD ["flplatform", "serve", "--host", "0.0.0.0", "--port", "8000"]
