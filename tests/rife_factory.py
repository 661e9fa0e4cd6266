"""RIFE checkpoints with random weights in the released file's format (safetensors, the released keys and shapes),
as `python -m seedvr.tiny` writes the SeedVR2 ones: the interpolation's plumbing runs for real, its frames are
noise."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from seedvr.models.rife import IFNet
from seedvr.tools.tiny import randomise


def random_ifnet(seed: int = 0, **config) -> IFNet:
    """IFNet at the released size (or `config`'s), every weight random; in eval mode."""
    model = IFNet(**config)
    randomise(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_random_rife(path: Path, seed: int = 0) -> Path:
    """A released-size IFNet with random weights saved where the worker looks for RIFE (`path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in random_ifnet(seed).state_dict().items()}, path)
    return path
