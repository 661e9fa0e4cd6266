"""Write a tiny SeedVR2 installation with random weights, for plumbing checks.

    python -m seedvr.tiny DIR

DIR receives configs_3b/, configs_7b/, ckpts/ and embeddings/ in exactly the
layout and file formats of the real installation (.pth checkpoints with the
official key names, bf16 text embeddings), but with the model classes built at
tiny widths. Point the worker at it with

    SEEDVR_CONFIG_DIR=DIR SEEDVR_CKPT_DIR=DIR/ckpts SEEDVR_EMBEDDINGS_DIR=DIR/embeddings

and every action runs on a CPU in seconds. The configs carry
`random_weights: true`, and the worker marks its answers accordingly: the
restored media are noise, only the plumbing is real.
"""

import argparse
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seedvr.models.registry import MODELS, NEGATIVE_EMBEDDING, POSITIVE_EMBEDDING, VAE_CHECKPOINT
from seedvr.models.vae import VideoAutoencoder
from seedvr.settings import REPO_ROOT

# The same overrides as the official tiny goldens (../shared/reference/README.md), except that both DiTs
# take 48-channel text so that one embeddings folder serves both, as the real 5120-channel files do.
TEXT_CHANNELS = 48
DIT_OVERRIDES = {
    "3b": {"vid_dim": 64, "txt_dim": 64, "emb_dim": 384, "heads": 2, "head_dim": 32, "rope_dim": 32,
           "num_layers": 4, "mm_layers": 2, "txt_in_dim": TEXT_CHANNELS},
    "7b": {"vid_dim": 64, "txt_dim": 64, "emb_dim": 384, "heads": 2, "head_dim": 32,
           "num_layers": 4, "txt_in_dim": TEXT_CHANNELS},
}
VAE_OVERRIDES = {"block_out_channels": [8, 16, 24, 24], "norm_num_groups": 4}
POSITIVE_TOKENS, NEGATIVE_TOKENS = 58, 64  # the lengths of the official pos_emb.pt / neg_emb.pt


def tiny_config(size: str) -> DictConfig:
    config = OmegaConf.load(REPO_ROOT / f"configs_{size}" / "main.yaml")
    assert isinstance(config, DictConfig)
    config.dit.kwargs = OmegaConf.merge(config.dit.kwargs, DIT_OVERRIDES[size])
    config.vae.kwargs = OmegaConf.merge(config.vae.kwargs, VAE_OVERRIDES)
    config.random_weights = True
    return config


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a random value of a sensible scale (nothing zero, one or identity)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            elif name.endswith("scale") or "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def write(root: Path, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    ckpts, embeddings = root / "ckpts", root / "embeddings"
    ckpts.mkdir(parents=True, exist_ok=True)
    embeddings.mkdir(parents=True, exist_ok=True)

    for model in MODELS.values():
        size = model.config_folder.removeprefix("configs_")
        config = tiny_config(size)
        (root / model.config_folder).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, root / model.config_folder / "main.yaml")
        for checkpoint in model.dit_checkpoints.values():
            dit = model.dit_class(**OmegaConf.to_container(config.dit.kwargs))  # type: ignore[arg-type]
            randomise(dit, generator)
            torch.save(dit.state_dict(), ckpts / checkpoint)

    vae = VideoAutoencoder(**OmegaConf.to_container(tiny_config("3b").vae.kwargs))  # type: ignore[arg-type]
    randomise(vae, generator)
    torch.save(vae.state_dict(), ckpts / VAE_CHECKPOINT)
    for name, tokens in ((POSITIVE_EMBEDDING, POSITIVE_TOKENS), (NEGATIVE_EMBEDDING, NEGATIVE_TOKENS)):
        embedding = torch.randn(tokens, TEXT_CHANNELS, generator=generator).to(torch.bfloat16)
        torch.save(embedding, embeddings / name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m seedvr.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="folder to write configs_3b/, configs_7b/, ckpts/, embeddings/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.dir, args.seed)
    root = args.dir.resolve()
    print(f"tiny random-weight SeedVR2 written to {root}\n"
          f"export SEEDVR_CONFIG_DIR={root} SEEDVR_CKPT_DIR={root}/ckpts SEEDVR_EMBEDDINGS_DIR={root}/embeddings")


if __name__ == "__main__":
    main()
