"""One card per released model: what the schema, the loader, the weights tool and the memory plan know of it.

    card("seedvr2_7b").variants          # ("normal", "sharp")
    card("seedvr2_7b").dit_checkpoints   # {"normal": "seedvr2_ema_7b.pth", "sharp": ...}

The YAML configs (configs_3b/, configs_7b/) hold only constructor keyword arguments; everything else about a
model (its class, files, heads, Hugging Face repo, memory footprint) is here, once.
"""

from dataclasses import dataclass, field

from torch import nn

from seedvr.models.dit3b import NaDiT3B
from seedvr.models.dit7b import NaDiT7B
from seedvr.models.dit_base import NaDiTBase

VAE_CHECKPOINT = "ema_vae.pth"
POSITIVE_EMBEDDING, NEGATIVE_EMBEDDING = "pos_emb.pt", "neg_emb.pt"
VAE_BYTES = 501_296_454  # the VAE in bf16 (official manifest vae.tsv: 250,648,227 values)
VAE_WIDTH = 128  # channels of the VAE's full-resolution stage (block_out_channels[0])


@dataclass(frozen=True)
class FullSizeBytes:
    """The released DiT on a GPU: bf16 Linear weights, float32 norms, modulation and rope (from the manifests)."""

    dit_blocks: int  # all transformer blocks
    dit_block: int  # the largest block
    dit_other: int  # embeddings and output head


@dataclass(frozen=True)
class ModelCard:
    model_type: str  # the request's name, e.g. "seedvr2_3b"
    hf_repo: str
    config_folder: str  # under SEEDVR_CONFIG_DIR
    dit_class: type[NaDiTBase]
    heads: int  # attention heads of 128 dims: sp_size must divide them
    dit_width: int
    dit_checkpoints: dict[str, str] = field(hash=False)  # variant -> checkpoint file
    full_size: FullSizeBytes
    # Memory-plan constant: DiT activation elements per token per unit of width (benchmarks/calibrate_memory.py)
    dit_elements_per_token: float

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.dit_checkpoints)

    def weight_set(self, variant: str) -> str:
        """The name `python -m seedvr.weights --model` takes: 'seedvr2_7b' or 'seedvr2_7b_sharp'."""
        return self.model_type if variant == "normal" else f"{self.model_type}_{variant}"


MODELS: dict[str, ModelCard] = {
    "seedvr2_3b": ModelCard(
        model_type="seedvr2_3b", hf_repo="ByteDance-Seed/SeedVR2-3B", config_folder="configs_3b", dit_class=NaDiT3B,
        heads=20, dit_width=2560, dit_checkpoints={"normal": "seedvr2_ema_3b.pth"},
        full_size=FullSizeBytes(6_664_135_296, 317_339_732, 120_412_416), dit_elements_per_token=27.0),
    "seedvr2_7b": ModelCard(
        model_type="seedvr2_7b", hf_repo="ByteDance-Seed/SeedVR2-7B", config_folder="configs_7b", dit_class=NaDiT7B,
        heads=24, dit_width=3072,
        dit_checkpoints={"normal": "seedvr2_ema_7b.pth", "sharp": "seedvr2_ema_7b_sharp.pth"},
        full_size=FullSizeBytes(16_318_145_952, 453_281_832, 166_478_080), dit_elements_per_token=19.0),
}
MODEL_TYPES = tuple(MODELS)
DEFAULT_MODEL_TYPE = "seedvr2_3b"  # when a request names no model and none is warm
DEFAULT_VARIANT = "normal"
VARIANTS = tuple(dict.fromkeys(variant for card_ in MODELS.values() for variant in card_.variants))
WEIGHT_SETS = tuple(card_.weight_set(variant) for card_ in MODELS.values() for variant in card_.variants)
MAX_HEADS = max(card_.heads for card_ in MODELS.values())


def card(model_type: str) -> ModelCard:
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"unknown model {model_type!r}; one of {', '.join(MODEL_TYPES)}") from None


def card_of(dit: nn.Module) -> ModelCard:
    """The card of a built DiT (a tiny one included: the class decides)."""
    for candidate in MODELS.values():
        if type(dit) is candidate.dit_class:
            return candidate
    raise ValueError(f"{type(dit).__name__} is not the DiT of any registered model")


def owners_of(variant: str) -> tuple[str, ...]:
    """The models that have `variant`."""
    return tuple(name for name, model in MODELS.items() if variant in model.variants)


def split_weight_set(name: str) -> tuple[str, str]:
    """'seedvr2_7b_sharp' -> ('seedvr2_7b', 'sharp')."""
    for model in MODELS.values():
        for variant in model.variants:
            if model.weight_set(variant) == name:
                return model.model_type, variant
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(WEIGHT_SETS)}")


def variant_problem(model_type: str, variant: str, why: str = "") -> str | None:
    """Why `variant` cannot run on `model_type`, or None. `why` explains where model_type came from."""
    if variant in card(model_type).variants:
        return None
    owners = ", ".join(owners_of(variant)) or "no model"
    return f"model_variant {variant!r} exists only for {owners}, not {model_type}{why}"


def sp_size_problem(model_type: str, sp_size: int, why: str = "") -> str | None:
    """Why `sp_size` cannot split `model_type`'s attention heads, or None."""
    heads = card(model_type).heads
    if heads % sp_size == 0:
        return None
    divisors = ", ".join(str(size) for size in range(1, heads + 1) if heads % size == 0)
    return f"sp_size must divide the {heads} attention heads of {model_type}{why}: one of {divisors}, got {sp_size}"
