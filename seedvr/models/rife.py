"""RIFE's IFNet, release 4.13.2 of Practical-RIFE: the network that draws a frame at time t between two frames.

Huang et al., "Real-Time Intermediate Flow Estimation for Video Frame Interpolation" (ECCV 2022); the 4.x
releases of https://github.com/hzwer/Practical-RIFE (MIT). Written here from the published architecture; the
module names are the checkpoint's keys (`encode.cnn0.weight`, `block0.conv0.0.0.weight`,
`block3.convblock.7.beta`, `block1.lastconv.0.bias`, ...), so `load_state_dict(strict=True)` takes the released
file as it is. The constructor's defaults are the released model (5,364,312 parameters, 128 tensors).

How it works: a feature head encodes each frame; four IFBlocks, coarse to fine (the frame seen at 1/8, 1/4, 1/2,
then full size), each estimate the flow from the frame at t back to both inputs (a correction of the previous
block's flow) and a mask that says which warped input to trust where; the result is the two inputs warped to t,
mixed by the mask.

Shapes: `b` frames in the batch, `c` channels, `h w` the frame (padded to a multiple of `pad_multiple(scale)`).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class WeightFile:
    """A published weight file, pinned: the Hugging Face repo, the file, the commit and the file's checksum."""

    name: str  # what `python -m seedvr.weights --model` calls it
    hf_repo: str
    filename: str
    revision: str
    sha256: str
    size: int  # bytes


# Practical-RIFE 4.13.2 as safetensors (fp32, the keys below without the training's "module." prefix), mirrored
# by imaginAIry. The checksum is the one published for that file (its Git LFS pointer); the size is what this
# class's state dict saved as safetensors comes to, byte for byte (tests/test_interpolation.py).
RIFE_WEIGHTS = WeightFile(
    name="rife", hf_repo="imaginairy/rife-interpolation", filename="rife-flownet-4.13.2.safetensors",
    revision="26442e52cc30b88c5cb490702647b8de9aaee8a7",
    sha256="c5544dfda88abead0f713c3a79338a1eb0ac6a4573e1c5de76d21e2af3839555", size=21_469_616)

FLOW_CHANNELS = 4  # (x, y) to the first frame, then (x, y) to the second, in pixels
BLOCK_OUTPUT_CHANNELS = 6  # flow (4) + mask logit (1) + one channel the released blocks emit and nothing reads
IMAGE_CHANNELS = 3
BLOCK_STRIDE = 4  # an IFBlock halves the frame twice before its residual convolutions
LEAKY_SLOPE = 0.2


def pad_multiple(scale: float = 1.0) -> int:
    """What the frame's sides must divide by: the coarsest block sees it at 1/(8/scale), then halves it twice."""
    return int(8 / scale) * BLOCK_STRIDE


def backward_warp(image: Tensor, flow: Tensor) -> Tensor:
    """`image` (b, c, h, w) sampled at every pixel moved by `flow` (b, 2, h, w: x then y, in pixels), bilinear;
    pixels outside repeat the border. The sampling runs in float32 whatever the input's precision."""
    b, _, h, w = image.shape
    ys = torch.linspace(-1.0, 1.0, h, device=image.device)
    xs = torch.linspace(-1.0, 1.0, w, device=image.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2): x, y in [-1, 1]
    # pixels -> grid units: align_corners=True puts -1 and 1 on the centres of the edge pixels
    per_pixel = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], device=image.device)
    offsets = rearrange(flow.float(), "b xy h w -> b h w xy") * per_pixel
    warped = F.grid_sample(image.float(), grid + offsets, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.to(image.dtype)


def conv_act(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 convolution and LeakyReLU (checkpoint keys `<name>.0.weight`, `<name>.0.bias`)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(LEAKY_SLOPE))


class FeatureHead(nn.Module):
    """Per-frame features at full size: (b, 3, h, w) -> (b, feature_channels, h, w), via half size."""

    def __init__(self, width: int = 32, feature_channels: int = 8):
        super().__init__()
        self.cnn0 = nn.Conv2d(IMAGE_CHANNELS, width, 3, 2, 1)
        self.cnn1 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn2 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(width, feature_channels, 4, 2, 1)
        self.relu = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.cnn0(x))  # (b, width, h/2, w/2)
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)  # (b, feature_channels, h, w)


class ResConv(nn.Module):
    """3x3 convolution with a learned per-channel gain `beta`, added to its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.relu = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    """One level of the coarse-to-fine flow estimate, run on the frame shrunk by `scale`.

    Input (b, in_channels, h, w) and the flow so far (b, 4, h, w) or None; returns the flow (or its correction,
    b, 4, h, w, in full-size pixels) and the mask logit (b, 1, h, w).
    """

    def __init__(self, in_channels: int, width: int, residual_convs: int = 8):
        super().__init__()
        self.conv0 = nn.Sequential(conv_act(in_channels, width // 2, 2), conv_act(width // 2, width, 2))
        self.convblock = nn.Sequential(*(ResConv(width) for _ in range(residual_convs)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(width, BLOCK_OUTPUT_CHANNELS * 4, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: Tensor, flow: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:  # flows shrink with the frame: pixels at 1/scale are 1/scale as long
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), dim=1)
        features = self.convblock(self.conv0(x))  # (b, width, h/(4·scale), w/(4·scale))
        out = self.lastconv(features)  # (b, 6, h/scale, w/scale)
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :FLOW_CHANNELS] * scale, out[:, FLOW_CHANNELS:FLOW_CHANNELS + 1]


class IFNet(nn.Module):
    """The frame at time t in (0, 1) between `image0` and `image1`.

    Args:
        block_widths: channels of the IFBlocks, coarsest first (one block per entry of `block_scales`).
        block_scales: how much each block shrinks the frame, at `scale` 1.
        head_width: channels inside the feature head.
        feature_channels: channels of each frame's features.
    The defaults are the released 4.13.2 checkpoint.
    """

    def __init__(self, block_widths: Sequence[int] = (192, 128, 96, 64), block_scales: Sequence[int] = (8, 4, 2, 1),
                 head_width: int = 32, feature_channels: int = 8):
        super().__init__()
        if len(block_widths) != len(block_scales):
            raise ValueError(f"one width per block scale: got widths {tuple(block_widths)} for scales "
                             f"{tuple(block_scales)}")
        self.block_scales = tuple(block_scales)
        # block 0 sees both frames, both features and t; the later ones see the warped frames and features, t,
        # the mask so far and the flow so far
        first = 2 * IMAGE_CHANNELS + 2 * feature_channels + 1
        later = first + 1 + FLOW_CHANNELS
        for index, width in enumerate(block_widths):
            self.add_module(f"block{index}", IFBlock(first if index == 0 else later, width))
        self.encode = FeatureHead(head_width, feature_channels)

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{index}") for index in range(len(self.block_scales))]

    def forward(self, image0: Tensor, image1: Tensor, timestep: Tensor, scale: float = 1.0) -> Tensor:
        """image0, image1: (b, 3, h, w) in [0, 1], h and w multiples of `pad_multiple(scale)`; timestep: (b,),
        each in [0, 1]. `scale` < 1 estimates the flow on a smaller frame (Practical-RIFE's --scale, for 4K).
        Returns (b, 3, h, w)."""
        b, _, h, w = image0.shape
        multiple = pad_multiple(scale)
        if h % multiple or w % multiple:
            raise ValueError(f"IFNet at scale {scale} needs sides that divide by {multiple}; got {h}x{w}: pad the frames")
        t = timestep.to(image0.dtype).reshape(b, 1, 1, 1).expand(b, 1, h, w)
        features0, features1 = self.encode(image0), self.encode(image1)  # (b, feature_channels, h, w) each
        flow: Tensor | None = None
        mask = torch.zeros_like(t)
        warped0, warped1 = image0, image1
        for block, block_scale in zip(self.blocks, self.block_scales):
            if flow is None:
                flow, mask = block(torch.cat((image0, image1, features0, features1, t), dim=1), None, block_scale / scale)
            else:
                moved0 = backward_warp(features0, flow[:, :2])
                moved1 = backward_warp(features1, flow[:, 2:4])
                correction, mask = block(torch.cat((warped0, warped1, moved0, moved1, t, mask), dim=1), flow,
                                         block_scale / scale)
                flow = flow + correction
            warped0 = backward_warp(image0, flow[:, :2])
            warped1 = backward_warp(image1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)
