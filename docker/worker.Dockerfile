# GPU worker: one container per GPU, one DeepGen model resident, consuming one model queue.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t diffgentor-worker .
#
# The torch wheel carries its own CUDA libraries; the base image and the wheel index must agree on
# the CUDA major/minor version, and the host driver must support it (nvidia-smi shows the maximum).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG TORCH_SPEC="torch>=2.4,<3"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 22.04 ships Python 3.10; the project is tested on 3.11 (deadsnakes). tini forwards SIGTERM
# so Celery's warm shutdown can finish the running job.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates tini \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# torch first, from the CUDA wheel index, so the extras below keep it instead of pulling another build.
RUN pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY worker ./worker
COPY api_client ./api_client
COPY migrations ./migrations
RUN pip install ".[deepgen,postgres,metrics]" \
 && python -c "import torch, worker, api_client; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root; models are mounted read-only under /models and never downloaded at run time.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin diffgentor \
 && mkdir -p /models && chown diffgentor /models
USER diffgentor
ENV HOME=/home/diffgentor \
    HF_HOME=/home/diffgentor/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DG_HOME=/home/diffgentor/.diffgentor \
    DG_DEEPGEN_CONFIG=deepgen \
    DG_DEEPGEN_DIFFUSION_MODEL_PATH=/models/sd3.5-medium \
    DG_DEEPGEN_AR_MODEL_PATH=/models/qwen2.5-vl-3b \
    DG_DEEPGEN_CHECKPOINT=/models/deepgen/model.pt

# `command:` in compose can replace the model name (CMD); the worker itself stays the entrypoint.
ENTRYPOINT ["tini", "--", "diffgentor", "worker"]
CMD ["--model_name", "deepgen"]
