"""Fetch and check the official SeedVR2 weights.

    python -m seedvr.weights download --model seedvr2_3b | seedvr2_7b | seedvr2_7b_sharp
    python -m seedvr.weights verify   --model ...

Files come from the Hugging Face repos ByteDance-Seed/SeedVR2-3B and
ByteDance-Seed/SeedVR2-7B into SEEDVR_CKPT_DIR / SEEDVR_EMBEDDINGS_DIR
(defaults: ckpts/ and embeddings/, or /runpod-volume/seedvr/ when a network
volume is mounted). Downloads resume where they stopped. Each file is checked
after download: checkpoints must load strictly into our model classes (every
key and shape), embeddings must fit the DiT's text width.
"""

import argparse
import os
import socket
import sys
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download
from omegaconf import OmegaConf

from seedvr import loader
from seedvr.checkpoint import load_strict, read_state_dict
from seedvr.errors import CheckpointError, RestoreError
from seedvr.models.vae import VideoAutoencoder, convert_legacy_vae_keys

REPOS = {"seedvr2_3b": "ByteDance-Seed/SeedVR2-3B", "seedvr2_7b": "ByteDance-Seed/SeedVR2-7B"}
MODEL_NAMES = ("seedvr2_3b", "seedvr2_7b", "seedvr2_7b_sharp")
REACH_TIMEOUT_S = 2.0


def split_name(name: str) -> tuple[str, str]:
    """'seedvr2_7b_sharp' -> ('seedvr2_7b', 'sharp')."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return (name.removesuffix("_sharp"), "sharp") if name.endswith("_sharp") else (name, "normal")


def check_hub_reachable() -> None:
    """Fail within a couple of seconds when the hub cannot be reached, instead of retrying for minutes."""
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError("HF_HUB_OFFLINE is set, so the weights cannot be downloaded; unset it or copy the "
                              "files into SEEDVR_CKPT_DIR / SEEDVR_EMBEDDINGS_DIR")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise CheckpointError(f"cannot reach {endpoint.hostname}:{port} to download the weights "
                              f"({type(error).__name__}); check the network or copy the files into "
                              f"SEEDVR_CKPT_DIR / SEEDVR_EMBEDDINGS_DIR") from None


def verify(model_type: str, variant: str) -> None:
    """Check every file of a model: checkpoints load strictly (on the meta device), embeddings fit."""
    config = loader.load_config(model_type)
    files = loader.check_files(model_type, variant)
    with torch.device("meta"):
        dit = loader.DIT_CLASSES[config.dit.architecture](**OmegaConf.to_container(config.dit.kwargs))
        vae = VideoAutoencoder(**OmegaConf.to_container(config.vae.kwargs))
    load_strict(dit, read_state_dict(files.dit), files.dit)
    load_strict(vae, convert_legacy_vae_keys(read_state_dict(files.vae)), files.vae)
    for path in (files.positive_embedding, files.negative_embedding):
        embedding = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 \
                or embedding.shape[1] != config.dit.kwargs.txt_in_dim:
            raise CheckpointError(f"{path} is not a [tokens, {config.dit.kwargs.txt_in_dim}] text embedding")


def download(name: str) -> None:
    model_type, variant = split_name(name)
    config = loader.load_config(model_type)
    files = loader.model_files(config, variant)
    wanted = [path for path in files.all() if not path.is_file()]
    if wanted:
        check_hub_reachable()
    for path in wanted:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {REPOS[model_type]}/{path.name} -> {path}", flush=True)
        try:
            hf_hub_download(REPOS[model_type], path.name, local_dir=path.parent, etag_timeout=REACH_TIMEOUT_S)
        except Exception as error:
            raise CheckpointError(f"download of {REPOS[model_type]}/{path.name} failed: "
                                  f"{type(error).__name__}: {str(error)[:200]}") from None
    verify(model_type, variant)
    print(f"{name}: all files present and verified", flush=True)


def auto_download_enabled() -> bool:
    return os.environ.get("SEEDVR_AUTO_DOWNLOAD") == "1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedvr.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("download", "verify"))
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.model)
        else:
            verify(*split_name(args.model))
            print(f"{args.model}: all files present and verified")
    except RestoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
