"""Causal video layers of the SeedVR2 VAE: a 3-D convolution that never looks at
future frames, the per-frame GroupNorm, and the cache that lets a clip be
processed in temporal chunks with results equal to one pass over the clip.

Causality in time: a conv with temporal padding `pt` sees `2·pt` copies of the
first frame before the clip and nothing after it. When a clip is cut into
chunks, every conv instead prepends the input frames that the previous chunk
left unconsumed (`kt - st` of them for the shapes used here), kept in a
`TemporalCache`. Norms and attention work frame by frame, so chunking is exact.

Memory format: every conv has a `memory_format`. `torch.contiguous_format` (the default) leaves tensors
as the ops produce them, NCDHW: the float32 reference path. `torch.channels_last_3d` (NDHWC) makes every
conv input that layout (the time padding is written into one buffer already in it; the model's weights
are converted by `VideoAutoencoder.memory_format`); see `conv_memory_format` for when and why.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GIB = 1024**3
# cuDNN (and PyTorch's own kernels) index a conv's tensors with 32-bit integers: a larger output is refused or
# sent to a slow fallback, so it is computed in pieces like an input over max_input_bytes.
MAX_CONV_ELEMENTS = 2**31 - 1

# fp32 working set of one per-frame GroupNorm call; larger inputs are normalised
# a few frames at a time (exact: statistics never cross frames).
NORM_CHUNK_BYTES = GIB // 2

CONV_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last_3d)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def conv_memory_format(device: torch.device | str, dtype: torch.dtype) -> torch.memory_format:
    """The layout the VAE's convolutions run in on `device` at `dtype`.

    channels_last_3d for half precision on CUDA: on cuDNN 9.8 to 9.14, PyTorch refuses cuDNN for a bf16/fp16
    5-D convolution with a kernel larger than 1 when `cudnn_conv_suggest_memory_format(input, weight)` is
    contiguous, i.e. when neither the input nor the weight is channels_last_3d (pytorch #163539, PR #163581,
    `ConvParams::use_cudnn` in aten/src/ATen/native/Convolution.cpp), and falls back to slow_conv_dilated3d
    (vol2col): 1.6-3.7x slower per conv on Hopper and scratch memory about 27x the conv input (sglang #23200,
    #27431; LightX2V #860). In channels_last_3d cuDNN also skips its NCDHW<->NDHWC transposes on every
    cuDNN. Everywhere else contiguous: the float32 CPU path the goldens were made with, unchanged.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype in HALF_DTYPES:
        return torch.channels_last_3d
    return torch.contiguous_format


def check_conv_memory_format(memory_format: torch.memory_format) -> torch.memory_format:
    if memory_format not in CONV_MEMORY_FORMATS:
        raise ValueError(f"VAE memory format must be one of {', '.join(map(str, CONV_MEMORY_FORMATS))}; "
                         f"got {memory_format}")
    return memory_format


def in_layout(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """x in `memory_format` (a copy only when it is not already); contiguous_format: x as it is."""
    if memory_format == torch.contiguous_format:
        return x
    return x.contiguous(memory_format=memory_format)


def join_frames(parts: list[Tensor], memory_format: torch.memory_format) -> Tensor:
    """torch.cat(parts, dim=2), written into one buffer in `memory_format` (contiguous_format: a plain cat)."""
    if memory_format == torch.contiguous_format:
        return torch.cat(parts, dim=2)
    first = parts[0]
    shape = (first.size(0), first.size(1), sum(part.size(2) for part in parts), *first.shape[3:])
    out = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=memory_format)
    return torch.cat(parts, dim=2, out=out)


class TemporalCache:
    """Frames carried from one temporal chunk of a clip to the next.

    Create one per encode/decode call, pass it to every layer of each chunk in
    order, and call `next_chunk()` between chunks. Each causal conv stores the
    tail of its (time-padded) input that its windows have not consumed yet; the
    next chunk starts from that tail instead of replicating its first frame.
    """

    def __init__(self) -> None:
        self.is_first_chunk = True
        self._tails: dict[nn.Module, Tensor] = {}

    def next_chunk(self) -> None:
        self.is_first_chunk = False

    def pop(self, layer: nn.Module) -> Tensor | None:
        return self._tails.pop(layer, None)

    def put(self, layer: nn.Module, frames: Tensor) -> None:
        self._tails[layer] = frames

    def extend(self, layer: "CausalConv3d", x: Tensor) -> Tensor:
        """x (B, C, T, H, W) -> the frames `layer` convolves: x after the causal head (the first chunk) or
        after the previous chunk's tail; keeps this chunk's unconsumed tail for the next one."""
        head = layer.first_frame_padding(x) if self.is_first_chunk else self.pop(layer)
        if head is not None:
            x = join_frames([head, x], layer.memory_format)
        tail = layer.unconsumed_frames(x.size(2))
        if tail:  # clone: a view would keep the whole chunk alive
            self.put(layer, x[:, :, x.size(2) - tail :].clone())
        return x


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time (first-frame replication), zero-padded in space.

    `padding` is `(pt, ph, pw)` (or one int): `2·pt` copies of the first frame
    are prepended, `ph`/`pw` zero rows/columns are added on both sides. Inputs
    whose padded size exceeds `max_input_bytes`, or whose output would exceed
    MAX_CONV_ELEMENTS, are convolved in pieces along H, each with the halo rows
    its kernel needs (exact).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_padding = pt
        self.space_padding = (ph, pw)
        self.max_input_bytes = GIB // 2
        self.memory_format = torch.contiguous_format  # of every input it convolves (see the module docstring)

    def forward(self, x: Tensor, cache: TemporalCache | None = None) -> Tensor:
        # x: (B, C, T, H, W) -> (B, C_out, T_out, H_out, W_out)
        x = self._extend_time(x, cache)
        return self._convolve(x)

    def _extend_time(self, x: Tensor, cache: TemporalCache | None) -> Tensor:
        if cache is not None:
            return cache.extend(self, x)
        head = self.first_frame_padding(x)
        return x if head is None else join_frames([head, x], self.memory_format)

    def first_frame_padding(self, x: Tensor) -> Tensor | None:
        """The 2·pt copies of x's first frame that a clip starts with (None without temporal padding)."""
        if self.time_padding == 0:
            return None
        return x[:, :, :1].expand(-1, -1, 2 * self.time_padding, -1, -1)

    def unconsumed_frames(self, frames: int) -> int:
        """Trailing frames of a time-extended input of `frames` frames, from where the first window that does
        not fit would start: what the next chunk of the clip must be prefixed with."""
        kt, st = self.kernel_size[0], self.stride[0]
        windows = (frames - kt) // st + 1 if frames >= kt else 0
        return frames - windows * st

    def _convolve(self, x: Tensor) -> Tensor:
        x = in_layout(x, self.memory_format)  # no copy when the layers before kept the layout (CUDA)
        ph, pw = self.space_padding
        batch, channels, frames, height, width = x.shape
        padded_bytes = batch * channels * frames * (height + 2 * ph) * (width + 2 * pw) * x.element_size()
        kh, sh = self.kernel_size[1], self.stride[1]
        rows_out = (height + 2 * ph - kh) // sh + 1
        frames_out = (frames - self.kernel_size[0]) // self.stride[0] + 1
        width_out = (width + 2 * pw - self.kernel_size[2]) // self.stride[2] + 1
        out_elements = batch * self.out_channels * frames_out * rows_out * width_out
        pieces = min(rows_out, max(math.ceil(padded_bytes / self.max_input_bytes),
                                   math.ceil(out_elements / MAX_CONV_ELEMENTS)))
        if pieces <= 1:
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, ph, pw))

        out: Tensor | None = None
        for first, last in _even_ranges(rows_out, pieces):
            # input rows [top, bottom) in unpadded coordinates, may reach into the zero padding
            top = first * sh - ph
            bottom = (last - 1) * sh + kh - ph
            piece = x[:, :, :, max(top, 0) : min(bottom, height)]
            piece = in_layout(F.pad(piece, (pw, pw, max(-top, 0), max(bottom - height, 0))), self.memory_format)
            rows = F.conv3d(piece, self.weight, self.bias, self.stride)  # (B, C_out, T_out, last - first, W_out)
            if out is None:
                out = torch.empty((*rows.shape[:3], rows_out, rows.size(4)), dtype=rows.dtype, device=rows.device,
                                  memory_format=self.memory_format)
            out[:, :, :, first:last] = rows
        assert out is not None  # pieces > 1, so the loop ran
        return out


def pointwise_conv(conv: nn.Conv3d, x: Tensor, max_bytes: int, memory_format: torch.memory_format) -> Tensor:
    """A 1x1x1 conv in pieces along H when its output exceeds `max_bytes` or MAX_CONV_ELEMENTS (exact: each
    output pixel depends on its own input pixel only)."""
    batch, _, frames, height, width = x.shape
    out_elements = batch * conv.out_channels * frames * height * width
    pieces = min(height, max(math.ceil(out_elements * x.element_size() / max_bytes),
                             math.ceil(out_elements / MAX_CONV_ELEMENTS)))
    if pieces <= 1:
        return conv(x)
    out = torch.empty((batch, conv.out_channels, frames, height, width), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    for first, last in _even_ranges(height, pieces):
        out[:, :, :, first:last] = conv(in_layout(x[:, :, :, first:last], memory_format))  # rows of it: a copy
    return out


def _even_ranges(total: int, pieces: int) -> list[tuple[int, int]]:
    """Split range(total) into `pieces` contiguous [first, last) ranges of near-equal size."""
    bounds = [total * i // pieces for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm applied to each frame of a (B, C, T, H, W) video on its own.

    Statistics and the affine transform are computed in float32 and the result
    cast back to the input dtype (what the official bf16 runs do under autocast),
    in the input's memory layout. The float32 copy of each chunk is made NCHW in
    the same pass as the cast: group_norm wants that layout (CUDA copies any
    other; on CPU the values are the same either way).

    `silu`: the activation that follows every norm but the attention's, applied to
    each chunk as it is written (the same values as `F.silu` on the whole output:
    the norm is rounded to the input dtype first, as the official norm wrapper
    does, and silu then computes as it would on that tensor), so no second
    full-size activation is allocated, and torch.compile can fuse the two.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, frames, height, width = x.shape
        frame_bytes = batch * channels * height * width * 4
        frames_per_chunk = max(1, NORM_CHUNK_BYTES // frame_bytes)
        weight, bias = self.weight.float(), self.bias.float()

        out = torch.empty_like(x)
        for t0 in range(0, frames, frames_per_chunk):
            chunk = x[:, :, t0 : t0 + frames_per_chunk]
            n = chunk.size(2)
            flat = chunk.transpose(1, 2).flatten(0, 1)  # (B·n, C, H, W)
            flat = flat.to(torch.float32, memory_format=torch.contiguous_format)
            normed = F.group_norm(flat, self.num_groups, weight, bias, self.eps)
            part = normed.unflatten(0, (batch, n)).transpose(1, 2).to(x.dtype)
            out[:, :, t0 : t0 + n] = F.silu(part) if self.silu else part
        return out
