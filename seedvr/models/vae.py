"""The SeedVR2 causal video VAE (official `VideoAutoencoderKLWrapper`, `ema_vae.pth`).

Encode: video (B, 3, T, H, W) in [-1, 1], T = 4k + 1 -> posterior mean and
log-variance (B, 16, k + 1, H/8, W/8). Decode: latent -> video. The first frame
is always encoded alone into the first latent frame (causal in time).

Long clips are processed in temporal chunks (`temporal_chunk` frames each after
the first 1 + `temporal_chunk`), with every causal conv carrying the frames it
still needs to the next chunk, so the result equals a single pass over the clip.
Posterior sampling and latent scaling belong to the pipeline, not to this module.

`memory_format` is the layout policy of the convolutions (seedvr.models.causal_conv.conv_memory_format):
contiguous NCDHW by default, channels_last_3d for half precision on CUDA. Inputs and outputs of
`encode`/`decode` are contiguous NCDHW either way.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from seedvr.models.causal_conv import CausalConv3d, TemporalCache, check_conv_memory_format, in_layout
from seedvr.models.vae_blocks import Decoder3D, Encoder3D, Upsample3D
from seedvr.models.vae_tiling import SpatialTiling

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel

LOGVAR_RANGE = (-30.0, 20.0)

_SUPPORTED = {
    "act_fn": ("silu", "swish"),
    "down_block_types": ("DownEncoderBlock3D",),
    "up_block_types": ("UpDecoderBlock3D",),
    # The mode only says how 4-D (2-D conv) weights would be inflated; "pad"
    # (the official setting) refuses them, and so do we: checkpoints hold 5-D weights.
    "inflation_mode": ("pad",),
}


class VideoAutoencoder(nn.Module):
    """Causal 3-D VAE. Takes the official constructor keyword arguments."""

    def __init__(
        self,
        *,
        act_fn: str = "silu",
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        down_block_types: Sequence[str] = ("DownEncoderBlock3D",) * 4,
        up_block_types: Sequence[str] = ("UpDecoderBlock3D",) * 4,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        slicing_sample_min_size: int = 4,
        temporal_scale_num: int = 2,
        inflation_mode: str = "pad",
        spatial_downsample_factor: int = 8,
        temporal_downsample_factor: int = 4,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        freeze_encoder: bool = False,  # training-only flag of the official wrapper; no effect here
    ) -> None:
        super().__init__()
        num_blocks = len(block_out_channels)
        _check_choice("act_fn", [act_fn])
        _check_choice("down_block_types", down_block_types)
        _check_choice("up_block_types", up_block_types)
        _check_choice("inflation_mode", [inflation_mode])
        if len(down_block_types) != num_blocks or len(up_block_types) != num_blocks:
            raise ValueError(
                f"need one down and one up block per entry of block_out_channels ({num_blocks}), "
                f"got {len(down_block_types)} down and {len(up_block_types)} up"
            )
        if not 0 <= temporal_scale_num <= num_blocks - 1:
            raise ValueError(f"temporal_scale_num must be in [0, {num_blocks - 1}], got {temporal_scale_num}")
        if spatial_downsample_factor != 2 ** (num_blocks - 1):
            raise ValueError(
                f"spatial_downsample_factor {spatial_downsample_factor} != 2**(len(block_out_channels) - 1) "
                f"= {2 ** (num_blocks - 1)}"
            )
        if temporal_downsample_factor != 2**temporal_scale_num:
            raise ValueError(
                f"temporal_downsample_factor {temporal_downsample_factor} != 2**temporal_scale_num "
                f"= {2**temporal_scale_num}"
            )
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"every block_out_channels {list(block_out_channels)} must divide by {norm_num_groups}")

        self.latent_channels = latent_channels
        self.spatial_downsample_factor = spatial_downsample_factor
        self.temporal_downsample_factor = temporal_downsample_factor
        # Frames per temporal chunk when encoding (latent frames per chunk when
        # decoding: this / temporal_downsample_factor). None: one pass over the
        # whole clip, fastest but its activation memory grows with the clip.
        self.temporal_chunk: int | None = slicing_sample_min_size
        # Opt-in spatial tiles (approximate, seedvr.models.vae_tiling); None: whole frames (exact).
        self.tiling: SpatialTiling | None = None
        self._memory_format = torch.contiguous_format

        blocks: dict[str, Any] = dict(
            block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block,
            groups=norm_num_groups,
            temporal_scale_num=temporal_scale_num,
        )
        self.encoder = Encoder3D(in_channels, 2 * latent_channels, **blocks)
        self.decoder = Decoder3D(latent_channels, out_channels, **blocks)
        self.quant_conv = CausalConv3d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = CausalConv3d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def width(self) -> int:
        """Channels of the full-resolution stage (block_out_channels[0]): the memory plan's activation unit."""
        return self.encoder.conv_in.out_channels

    @property
    def conv_max_bytes(self) -> int:
        """Largest padded conv input processed in one piece; larger ones are split along H (exact)."""
        return next(m.max_input_bytes for m in self.modules() if isinstance(m, CausalConv3d))

    @conv_max_bytes.setter
    def conv_max_bytes(self, value: int) -> None:
        if value <= 0:
            raise ValueError(f"conv_max_bytes must be positive, got {value}")
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.max_input_bytes = value
            elif isinstance(module, Upsample3D):
                module.max_output_bytes = value

    @property
    def memory_format(self) -> torch.memory_format:
        """Layout of every conv weight and conv input: contiguous_format or channels_last_3d."""
        return self._memory_format

    @memory_format.setter
    def memory_format(self, value: torch.memory_format) -> None:
        """Convert the conv weights now and make every layer keep its conv inputs in `value`. Set it after
        loading weights (an assigning load takes the checkpoint's layout)."""
        self._memory_format = check_conv_memory_format(value)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=value)
            if isinstance(module, (CausalConv3d, Upsample3D)):
                module.memory_format = value

    def _in(self, x: Tensor) -> Tensor:
        """A chunk entering the encoder or decoder, in the conv layout."""
        return in_layout(x, self._memory_format)

    def _out(self, x: Tensor) -> Tensor:
        """A chunk's result back in NCDHW, the layout the pipeline draws its noise like (and SP gathers)."""
        return x if self._memory_format == torch.contiguous_format else x.contiguous()

    def encode(self, x: Tensor, sp: "SequenceParallel | None" = None) -> tuple[Tensor, Tensor]:
        """Video (B, C, T, H, W), T = 4k + 1 -> mean, logvar (B, 16, k + 1, H/8, W/8), logvar clamped.

        sp: run context parallel over this process's sequence-parallel group (seedvr.distributed); every
        rank passes the whole clip and receives the whole result.
        """
        if x.ndim != 5:
            raise ValueError(f"encode expects a (B, C, T, H, W) video, got shape {tuple(x.shape)}")
        frames, height, width = x.shape[2:]
        tdf, sdf = self.temporal_downsample_factor, self.spatial_downsample_factor
        if frames % tdf != 1 % tdf:
            raise ValueError(f"encode needs T = {tdf}k + 1 frames, got T = {frames}")
        if height % sdf or width % sdf:
            raise ValueError(f"encode needs H and W divisible by {sdf}, got {height}x{width}")

        def encode_chunk(chunk: Tensor, cache: TemporalCache | None) -> Tensor:
            h = self.encoder(self._in(chunk), cache)
            return self._out(h if self.quant_conv is None else self.quant_conv(h, cache))

        def encode_frames(video: Tensor) -> Tensor:
            return _run_chunked(encode_chunk, video, self._temporal_chunk(), unit=tdf, sp=sp)

        video = x.to(self.dtype)
        h = encode_frames(video) if self.tiling is None else self.tiling.encode(encode_frames, video, sdf)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor, sp: "SequenceParallel | None" = None) -> Tensor:
        """Latent (B, 16, T', h, w) -> video (B, 3, 4(T' - 1) + 1, 8h, 8w). sp: as for `encode`."""
        if z.ndim != 5:
            raise ValueError(f"decode expects a (B, C, T', h, w) latent, got shape {tuple(z.shape)}")

        def decode_chunk(chunk: Tensor, cache: TemporalCache | None) -> Tensor:
            chunk = self._in(chunk)
            if self.post_quant_conv is not None:
                chunk = self.post_quant_conv(chunk, cache)
            return self._out(self.decoder(chunk, cache))

        chunk = self._temporal_chunk()
        latent_chunk = None if chunk is None else chunk // self.temporal_downsample_factor

        def decode_frames(latent: Tensor) -> Tensor:
            return _run_chunked(decode_chunk, latent, latent_chunk, unit=1, sp=sp)

        z = z.to(self.dtype)
        if self.tiling is None:
            return decode_frames(z)
        return self.tiling.decode(decode_frames, z, self.spatial_downsample_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _temporal_chunk(self) -> int | None:
        chunk, tdf = self.temporal_chunk, self.temporal_downsample_factor
        if chunk is not None and (chunk <= 0 or chunk % tdf):
            raise ValueError(f"temporal_chunk must be a positive multiple of {tdf} or None, got {chunk}")
        return chunk


def _run_chunked(run: Callable[[Tensor, TemporalCache | None], Tensor], x: Tensor, chunk: int | None, unit: int,
                 sp: "SequenceParallel | None" = None) -> Tensor:
    """run(x) over time chunks [0, 1 + chunk), then `chunk` frames at a time, carrying causal state.

    unit: the frames one latent frame stands for (chunks after the first are multiples of it).
    sp: hand the chunks to the ranks of a sequence-parallel group instead (same result).
    """
    if sp is not None:
        return sp.run_temporal(run, x, chunk, unit)
    frames = x.size(2)
    if chunk is None or frames - 1 <= chunk:
        return run(x, None)
    lengths = [1 + chunk] + [min(chunk, frames - t) for t in range(1 + chunk, frames, chunk)]
    cache = TemporalCache()
    outputs: list[Tensor] = []
    for piece in x.split(lengths, dim=2):
        outputs.append(run(piece, cache))
        cache.next_chunk()
    return torch.cat(outputs, dim=2)


def _check_choice(name: str, values: Iterable[object]) -> None:
    for value in values:
        if value not in _SUPPORTED[name]:
            raise ValueError(f"unsupported {name} {value!r}; must be one of {list(_SUPPORTED[name])}")


_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


V = TypeVar("V")  # what the keys map to: tensors, or shapes (seedvr.tools.weights)


def convert_legacy_vae_keys(state_dict: dict[str, V]) -> dict[str, V]:
    """Rename old diffusers mid-block attention keys (query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0).

    Returns a new dict; keys already in the current naming pass through unchanged.
    """
    converted: dict[str, V] = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION_KEY.match(key)
        if match:
            prefix, name, kind = match.groups()
            key = f"{prefix}{_LEGACY_ATTENTION_NAMES[name]}.{kind}"
        if key in converted:
            raise ValueError(f"state dict holds {key!r} under both its legacy and its current name")
        converted[key] = value
    return converted
