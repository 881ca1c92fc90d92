# flplatform: migrations + API on port 8000. CPU-only torch keeps the image small.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FLP_DATABASE_URL=sqlite+aiosqlite:////data/flplatform.db
WORKDIR /app

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
COPY migrations ./migrations
RUN pip install . && useradd --create-home --uid 1000 flp && mkdir -p /data && chown flp /data

USER flp
VOLUME ["/data"]
EXPOSE 8000
# `serve` applies the migrations before it listens. Set FLP_SECRET_KEY and FLP_DATABASE_URL
# (postgresql+asyncpg://…) for production; FLP_ADMIN_* creates the first superuser.
CMD ["flplatform", "serve", "--host", "0.0.0.0", "--port", "8000"]
