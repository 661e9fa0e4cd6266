"""Build a ready-to-run SeedVR2 pipeline from a config folder and weight files.

The models are built on the meta device (no memory, no random init) and take
the checkpoint's tensors with a strict, assigning load, as the official runner
does. Missing files are reported all at once, with the command that fetches
them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from seedvr import settings
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.engine.pipeline import SeedVR2
from seedvr.errors import CheckpointError
from seedvr.models.dit_base import NaDiTBase
from seedvr.models.registry import NEGATIVE_EMBEDDING, POSITIVE_EMBEDDING, VAE_CHECKPOINT, card
from seedvr.models.vae import VideoAutoencoder, convert_legacy_vae_keys

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel


@dataclass(frozen=True)
class ModelFiles:
    """The weight files one model needs, resolved to absolute paths."""

    dit: Path
    vae: Path
    positive_embedding: Path
    negative_embedding: Path

    def all(self) -> tuple[Path, ...]:
        return (self.dit, self.vae, self.positive_embedding, self.negative_embedding)

    def missing(self) -> list[Path]:
        return [path for path in self.all() if not path.is_file()]


def config_path(model_type: str) -> Path:
    return settings.current().config_dir / card(model_type).config_folder / "main.yaml"


def load_config(model_type: str) -> DictConfig:
    """The model's YAML: the DiT's and the VAE's constructor kwargs and the VAE's latent scaling."""
    path = config_path(model_type)
    if not path.is_file():
        raise CheckpointError(f"config {path} not found; set SEEDVR_CONFIG_DIR to the folder holding configs_3b/ "
                              "and configs_7b/")
    config = OmegaConf.load(path)
    assert isinstance(config, DictConfig)
    return config


def prefer_converted(checkpoint: Path) -> Path:
    """The bf16 .safetensors that `python -m seedvr.weights convert` writes next to a .pth, when it exists."""
    converted = checkpoint.with_suffix(".safetensors")
    return converted if converted.is_file() else checkpoint


def checkpoint_paths(model_type: str, variant: str) -> tuple[Path, Path]:
    """The .pth files (DiT, VAE) of a model as released, in SEEDVR_CKPT_DIR."""
    checkpoints = card(model_type).dit_checkpoints
    if variant not in checkpoints:
        raise CheckpointError(f"{model_type} has no variant {variant!r} (available: {', '.join(checkpoints)})")
    ckpt = settings.current().ckpt_dir
    return ckpt / checkpoints[variant], ckpt / VAE_CHECKPOINT


def model_files(model_type: str, variant: str) -> ModelFiles:
    dit, vae = checkpoint_paths(model_type, variant)
    embeddings = settings.current().embeddings_dir
    return ModelFiles(dit=prefer_converted(dit), vae=prefer_converted(vae),
                      positive_embedding=embeddings / POSITIVE_EMBEDDING,
                      negative_embedding=embeddings / NEGATIVE_EMBEDDING)


def download_command(model_type: str, variant: str) -> str:
    return f"python -m seedvr.weights download --model {card(model_type).weight_set(variant)}"


def check_files(model_type: str, variant: str) -> ModelFiles:
    """Raise MODEL_NOT_AVAILABLE naming every missing file and how to get them."""
    files = model_files(model_type, variant)
    missing = files.missing()
    if missing:
        raise CheckpointError(
            f"{model_type} ({variant}) weights missing: {', '.join(str(p) for p in missing)}. "
            f"Download them with `{download_command(model_type, variant)}`, or point SEEDVR_CKPT_DIR / "
            f"SEEDVR_EMBEDDINGS_DIR at the folders holding them (`python -m seedvr.tiny DIR` makes a random-weight "
            f"set for plumbing checks)"
        )
    return files


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU as the official runs; float32 on CPU (the goldens' precision)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_models(model_type: str, config: DictConfig,
                 device: str | torch.device = "meta") -> tuple[NaDiTBase, VideoAutoencoder]:
    """The DiT and the VAE a config describes, uninitialised on `device` (meta: every key and shape, no memory)."""
    with torch.device(device):
        dit = card(model_type).dit_class(**OmegaConf.to_container(config.dit.kwargs))  # type: ignore[arg-type]
        vae = VideoAutoencoder(**OmegaConf.to_container(config.vae.kwargs))  # type: ignore[arg-type]
    return dit, vae


def load_embedding(path: Path, channels: int) -> torch.Tensor:
    """A text embedding file: one [tokens, channels] tensor, or CheckpointError naming the file."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"cannot read text embedding {path}: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != channels:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CheckpointError(f"text embedding {path} must be one [tokens, {channels}] tensor, got {shape}")
    return tensor


def _check_materialised(module: torch.nn.Module, source: Path) -> None:
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise CheckpointError(f"{source}: {name} was not filled by the checkpoint")


def load_pipeline(model_type: str, variant: str = "normal", *, device: torch.device | None = None,
                  attention_backend: str = "auto", sp: "SequenceParallel | None" = None) -> SeedVR2:
    """The model's weights read strictly into a ready pipeline on `device` (default: CUDA when present).
    sp: this rank's place in a sequence-parallel group (seedvr.spgroup's rank processes)."""
    config = load_config(model_type)
    files = check_files(model_type, variant)
    device = device or default_device()
    dtype = compute_dtype(device)

    dit, vae = build_models(model_type, config)

    load_strict(dit, read_state_dict(files.dit), files.dit)
    load_strict(vae, convert_legacy_vae_keys(read_state_dict(files.vae)), files.vae)
    _check_materialised(dit, files.dit)
    _check_materialised(vae, files.vae)
    dit.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)

    # Cast on the CPU, then move: the GPU never holds an fp32 copy of the DiT (13.6 GB for 3B, 33 GB for 7B).
    if dtype == torch.float32:
        dit.to(dtype=torch.float32)  # a converted bf16 .safetensors on a CPU worker
    else:
        dit.to_compute_dtype(dtype)
    dit.to(device)
    dit.attention_backend = attention_backend
    vae.to(device=device, dtype=dtype)

    txt_in_dim = config.dit.kwargs.txt_in_dim
    positive = load_embedding(files.positive_embedding, txt_in_dim)
    negative = load_embedding(files.negative_embedding, txt_in_dim)

    return SeedVR2(dit, vae, positive, negative, device=device, dtype=dtype, scaling_factor=config.vae.scaling_factor,
                   shifting_factor=config.vae.shifting_factor, sp=sp,
                   random_weights=bool(config.get("random_weights", False)))
