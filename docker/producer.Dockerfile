# Light image for everything that is not a GPU worker: migrations, the sweeper, bucket bootstrap and
# the `diffgentor` client. No torch: the base install is the producer side.
# Build from the repository root:  docker build -f docker/producer.Dockerfile -t diffgentor-producer .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY worker ./worker
COPY api_client ./api_client
COPY migrations ./migrations
RUN pip install ".[postgres,metrics]"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin diffgentor
USER diffgentor
ENV HOME=/home/diffgentor DG_HOME=/home/diffgentor/.diffgentor

ENTRYPOINT ["tini", "--"]
CMD ["diffgentor", "--help"]
