# SeedVR2 RunPod serverless worker.
#
#   docker build -t seedvr-worker .
#       weights from a network volume (/runpod-volume/seedvr/), or fetched on first use with SEEDVR_AUTO_DOWNLOAD=1
#   docker build --build-arg BAKE_MODEL=seedvr2_3b -t seedvr-worker .
#       weights baked into the image (a comma-separated list works: seedvr2_7b,seedvr2_7b_sharp), converted to
#       bf16 .safetensors (half the size, the same results on a GPU); BAKE_FORMAT=pth keeps the official files
#   docker build --build-arg INSTALL_FLASH_ATTN=1 -t seedvr-worker .
#       adds flash-attn, compiled in a CUDA devel stage (long: set MAX_JOBS to the cores you have)
#
# Every Python pin comes from pyproject.toml. torch and torchvision are installed first, from the PyTorch
# index of CUDA_VERSION (13.0.1 -> cu130, the build PyPI serves for torch 2.14.1; the driver must support
# CUDA 13.0); the pinned dependencies installed next keep that build.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
ARG INSTALL_FLASH_ATTN=0

# Python with libmagic, and the pinned dependencies
FROM nvidia/cuda:${CUDA_VERSION}-base-${UBUNTU} AS deps
ARG CUDA_VERSION
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libmagic1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml ./
RUN python -c 'import functools, operator, sys, tomllib; print("\n".join(functools.reduce(operator.getitem, sys.argv[1:], tomllib.load(open("pyproject.toml", "rb"))["project"])))' \
        dependencies > /opt/requirements.txt \
    && python -c 'import functools, operator, sys, tomllib; print("\n".join(functools.reduce(operator.getitem, sys.argv[1:], tomllib.load(open("pyproject.toml", "rb"))["project"])))' \
        optional-dependencies flash > /opt/requirements-flash.txt \
    && pip install "$(grep '^torch==' /opt/requirements.txt)" "$(grep '^torchvision==' /opt/requirements.txt)" \
        --index-url "https://download.pytorch.org/whl/cu$(echo "$CUDA_VERSION" | cut -d. -f1,2 | tr -d .)" \
    && pip install -r /opt/requirements.txt

# flash-attn: a wheel compiled against the torch above (stage flash-attn-1), or nothing (flash-attn-0).
# BuildKit builds only the stage INSTALL_FLASH_ATTN names; the `if` spares the legacy builder the compile.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS flash-attn-1
ARG INSTALL_FLASH_ATTN
ARG MAX_JOBS=8
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH \
    MAX_JOBS=${MAX_JOBS} FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /opt/requirements-flash.txt /opt/
RUN mkdir /wheels && if [ "$INSTALL_FLASH_ATTN" = 1 ]; then \
        pip install ninja packaging psutil wheel setuptools \
        && pip wheel --no-build-isolation --no-deps -r /opt/requirements-flash.txt -w /wheels; \
    fi

FROM deps AS flash-attn-0
RUN mkdir /wheels

FROM flash-attn-${INSTALL_FLASH_ATTN} AS flash-attn

FROM deps
ARG BAKE_MODEL=""
ARG BAKE_FORMAT=safetensors
# Baked weights are used even when a network volume is mounted (empty values leave the choice to seedvr/settings.py).
ENV SEEDVR_CKPT_DIR=${BAKE_MODEL:+/app/ckpts} SEEDVR_EMBEDDINGS_DIR=${BAKE_MODEL:+/app/embeddings} \
    HF_HUB_DISABLE_PROGRESS_BARS=1
COPY --from=flash-attn /wheels /tmp/wheels
RUN if ls /tmp/wheels/*.whl >/dev/null 2>&1; then pip install --no-deps /tmp/wheels/*.whl; fi && rm -rf /tmp/wheels

COPY README.md ./
COPY seedvr ./seedvr
COPY configs_3b ./configs_3b
COPY configs_7b ./configs_7b
COPY ckpts/README.md ./ckpts/README.md
COPY embeddings/README.md ./embeddings/README.md
COPY handler.py test_input.json ./
RUN pip install --no-deps -e .

RUN for model in $(echo "$BAKE_MODEL" | tr ',' ' '); do \
        python -m seedvr.weights download --model "$model" || exit 1; \
        if [ "$BAKE_FORMAT" = safetensors ]; then python -m seedvr.weights convert --model "$model" --delete-pth || exit 1; fi; \
    done \
    && rm -f ckpts/*.lock embeddings/*.lock

CMD ["python", "-u", "handler.py"]
