# SeedVR2 RunPod serverless worker.
#   docker build -t seedvr-worker .                                  # weights from a network volume / first use
#   docker build --build-arg BAKE_MODEL=seedvr2_3b -t seedvr-worker . # weights baked into the image
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG BAKE_MODEL=""
ARG INSTALL_FLASH_ATTN=0
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-pip python3-dev libmagic1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY seedvr ./seedvr
COPY configs_3b ./configs_3b
COPY configs_7b ./configs_7b
COPY ckpts/README.md ./ckpts/README.md
COPY embeddings/README.md ./embeddings/README.md
COPY handler.py test_input.json ./

# torch from the CUDA 12.8 index, pinned to the version pyproject.toml pins
RUN python3 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && python3 -m pip install -e . \
    && if [ "$INSTALL_FLASH_ATTN" = "1" ]; then python3 -m pip install -e ".[flash]"; fi

RUN if [ -n "$BAKE_MODEL" ]; then python3 -m seedvr.weights download --model "$BAKE_MODEL"; fi

CMD ["python3", "-u", "handler.py"]
