"""Building blocks of the SeedVR2 causal video VAE: resnet, down/up samplers,
the mid block with per-frame attention, and the encoder and decoder stacks.

Parameter names follow the official checkpoint (`ema_vae.pth`), which inherits
diffusers' 2-D VAE naming (`resnets.N.norm1`, `downsamplers.0.conv`,
`attentions.0.to_q`, ...). Every layer takes the optional `TemporalCache` of the
current encode/decode call; `None` means the whole clip is processed at once.
"""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from seedvr.models.causal_conv import CausalConv3d, FrameGroupNorm, TemporalCache, in_layout, join_frames, pointwise_conv

NORM_EPS = 1e-6


class ResnetBlock3D(nn.Module):
    """x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), with a 1x1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, in_channels, eps=NORM_EPS, silu=True)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = FrameGroupNorm(groups, out_channels, eps=NORM_EPS, silu=True)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        h = self.conv1(self.norm1(x), cache)  # norms with their SiLU: conv1(SiLU(GN1(x)))
        h = self.conv2(self.norm2(h), cache)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x, cache)
        return x + h


class Downsample3D(nn.Module):
    """Halve H and W (and T when `temporal`): pad right/bottom by one, conv k3 s2."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        kt, st, pt = (3, 2, 1) if temporal else (1, 1, 0)
        self.conv = CausalConv3d(channels, channels, (kt, 3, 3), stride=(st, 2, 2), padding=(pt, 0, 0))

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        # (B, C, T, H, W) -> (B, C, (T-1)/2+1 or T, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)), cache)


class Upsample3D(nn.Module):
    """Double H and W (and T when `temporal`) by a learned 1x1x1 conv and depth-to-space.

    The upscale conv's output channel ((x·2 + y)·z_count + z)·C + c becomes pixel
    (t·z_count + z, h·2 + x, w·2 + y) of channel c. In time, latent frame 0 stands
    alone ("remove head"): of its two copies only the first is kept, so a clip of
    T' latent frames becomes 2T' - 1 frames. Continuation chunks keep both copies.
    The depth-to-space copy writes its output in `memory_format` (the VAE's policy).
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.channels = channels
        self.time_ratio = 2 if temporal else 1
        self.upscale_conv = nn.Conv3d(channels, channels * 4 * self.time_ratio, kernel_size=1)
        self.conv = CausalConv3d(channels, channels, 3, padding=1)
        self.memory_format = torch.contiguous_format
        self.max_output_bytes = self.conv.max_input_bytes  # the upscale conv's output per piece (the VAE sets it)

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        batch, _, frames, height, width = x.shape
        x = pointwise_conv(self.upscale_conv, in_layout(x, self.memory_format), self.max_output_bytes,
                           self.memory_format)  # (B, 2·2·z·C, T, H, W), in pieces along H when large
        if self.memory_format == torch.channels_last_3d:
            x = x.permute(0, 2, 3, 4, 1).unflatten(-1, (2, 2, self.time_ratio, self.channels))  # (B, T, H, W, 2x, 2y, z, C)
            x = x.permute(0, 1, 6, 2, 4, 3, 5, 7)  # (B, T, z, H, 2x, W, 2y, C)
            x = x.reshape(batch, frames * self.time_ratio, height * 2, width * 2, self.channels).permute(0, 4, 1, 2, 3)
        else:
            x = x.unflatten(1, (2, 2, self.time_ratio, self.channels))  # (B, 2x, 2y, z, C, T, H, W)
            x = x.permute(0, 4, 5, 3, 6, 1, 7, 2)  # (B, C, T, z, H, 2x, W, 2y)
            x = x.reshape(batch, self.channels, frames * self.time_ratio, height * 2, width * 2)
        if self.time_ratio > 1 and (cache is None or cache.is_first_chunk):
            x = join_frames([x[:, :, :1], x[:, :, 2:]], self.memory_format)
        return self.conv(x, cache)


class MidBlock3D(nn.Module):
    """Resnet, single-head self-attention over each frame's pixels, resnet."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, groups) for _ in range(2)])
        attention = Attention(
            channels,
            heads=1,
            dim_head=channels,
            bias=True,
            norm_num_groups=groups,
            eps=NORM_EPS,
            residual_connection=True,
            upcast_softmax=True,
            _from_deprecated_attn_block=True,
            processor=AttnProcessor2_0(),  # type: ignore[arg-type]  # diffusers annotates only AttnProcessor; any processor works
        )
        self.attentions = nn.ModuleList([attention])

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        x = self.resnets[0](x, cache)
        batch, channels, frames, height, width = x.shape
        frames_2d = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        frames_2d = self.attentions[0](frames_2d)
        x = frames_2d.unflatten(0, (batch, frames)).transpose(1, 2)
        return self.resnets[1](x, cache)


class DownEncoderBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: str | None):
        """`downsample`: None, "space" (H, W) or "spacetime" (T, H, W)."""
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = None
        if downsample is not None:
            self.downsamplers = nn.ModuleList([Downsample3D(out_channels, temporal=downsample == "spacetime")])

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, cache)
        return x


class UpDecoderBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: str | None):
        """`upsample`: None, "space" (H, W) or "spacetime" (T, H, W)."""
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsample3D(out_channels, temporal=upsample == "spacetime")])

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


def _resampling(block_index: int, num_blocks: int, temporal_blocks: range) -> str | None:
    if block_index == num_blocks - 1:
        return None
    return "spacetime" if block_index in temporal_blocks else "space"


class Encoder3D(nn.Module):
    """Video (B, C_in, T, H, W) -> (B, 2·latent, (T-1)/2^k + 1, H/2^(n-1), W/2^(n-1)).

    Every block but the last halves H and W; the last `temporal_scale_num`
    downsampling blocks halve T as well.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: list[int],
        layers_per_block: int,
        groups: int,
        temporal_scale_num: int,
    ):
        super().__init__()
        n = len(block_out_channels)
        temporal_blocks = range(n - 1 - temporal_scale_num, n - 1)
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock3D(
                block_out_channels[max(i - 1, 0)],
                block_out_channels[i],
                layers_per_block,
                groups,
                _resampling(i, n, temporal_blocks),
            )
            for i in range(n)
        )
        self.mid_block = MidBlock3D(block_out_channels[-1], groups)
        self.conv_norm_out = FrameGroupNorm(groups, block_out_channels[-1], eps=NORM_EPS, silu=True)
        self.conv_out = CausalConv3d(block_out_channels[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(self.conv_norm_out(x), cache)  # GN -> SiLU -> conv_out


class Decoder3D(nn.Module):
    """Latent (B, latent, T', h, w) -> video (B, C_out, 2^k·(T'-1) + 1, h·2^(n-1), w·2^(n-1)).

    Blocks run with channels reversed; every block but the last doubles H and W,
    the first `temporal_scale_num` double T as well. Each block has one more
    resnet than its encoder counterpart.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: list[int],
        layers_per_block: int,
        groups: int,
        temporal_scale_num: int,
    ):
        super().__init__()
        n = len(block_out_channels)
        channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(in_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock3D(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                layers_per_block + 1,
                groups,
                _resampling(i, n, range(temporal_scale_num)),
            )
            for i in range(n)
        )
        self.conv_norm_out = FrameGroupNorm(groups, channels[-1], eps=NORM_EPS, silu=True)
        self.conv_out = CausalConv3d(channels[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor, cache: TemporalCache | None = None) -> Tensor:
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(self.conv_norm_out(x), cache)  # GN -> SiLU -> conv_out
