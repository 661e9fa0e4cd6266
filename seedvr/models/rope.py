"""3-D rotary position embeddings of the two DiTs (SEEDVR2_SPEC 2.8.2).

Each axis (t, h, w) owns n frequencies; a token at position p rotates the interleaved channel pairs
(2i, 2i+1) of the first R = 6n channels of every head by the angles p_axis * freq, axis blocks in order
[t | h | w], the remaining channels untouched. Positions are window-local. All rope math is float32 and
the result is cast back to the input dtype.

- 3B "mmrope3d": n = (rope_dim // 3) // 2 "lang" frequencies 10000^(-2j/(2n)); video tokens sit at
  (l + t, h, w) with l the text length of their sample, text token i at (i, i, i).
- 7B pixel rope: n = (head_dim // 2 // 3) // 2 frequencies pi * linspace(1, 128, n); video only, each
  window axis of extent e mapped to linspace(-1, 1, e).

The frequencies are the checkpoint's persistent fp32 buffer `...attn.rope.rope.freqs`, equal in every block
(deterministic functions of the config; the DiT checks it when loading). The cos/sin tables of a forward's
tokens are therefore built once per window kind (`RopeTables`, from the first block's rope) and every block
only rotates with them; the official code tabulates 1024x128x128 positions instead, about 8 GiB.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from seedvr.models.window import WindowPacking


@dataclass
class RopePositions:
    """Float32 positions of the tokens that get rotated (per axis t, h, w)."""

    vid: torch.Tensor  # [L, 3]
    txt: torch.Tensor | None  # [l, 3], or None when text is not rotated


def mmrope_positions(packing: WindowPacking, vid_lengths: list[int]) -> RopePositions:
    """3B: video (l_b + t, h, w) window-local, text (i, i, i)."""
    device = packing.local_coords.device
    txt_lengths = torch.tensor(packing.txt_lengths, device=device)
    vid_offset = torch.repeat_interleave(txt_lengths, torch.tensor(vid_lengths, device=device))
    vid = packing.local_coords.clone()
    vid[:, 0] += vid_offset
    txt = torch.cat([torch.arange(length, device=device) for length in packing.txt_lengths])
    return RopePositions(vid=vid.float(), txt=txt[:, None].expand(-1, 3).float())


def pixel_positions(packing: WindowPacking) -> RopePositions:
    """7B: every window axis of extent e spans linspace(-1, 1, e) (e = 1 -> -1); text is not rotated."""
    local, extent = packing.local_coords, packing.window_extent
    vid = torch.empty(local.shape, dtype=torch.float32, device=local.device)
    for size in torch.unique(extent).tolist():
        at = extent == size
        vid[at] = torch.linspace(-1, 1, size, device=local.device)[local[at]]
    return RopePositions(vid=vid, txt=None)


def lang_frequencies(axis_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """theta^(-2j/axis_dim), j < axis_dim // 2 (3B)."""
    return 1.0 / theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim)


def pixel_frequencies(axis_dim: int, max_freq: float = 256.0) -> torch.Tensor:
    """pi * linspace(1, max_freq / 2, axis_dim // 2) (7B)."""
    return torch.linspace(1.0, max_freq / 2, axis_dim // 2) * math.pi


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos and sin [N, 1, 3n] of the angles positions [N, 3] x freqs [n], axis blocks t | h | w."""
    angles = (positions[:, :, None] * freqs.float()).flatten(1)[:, None, :]
    return angles.cos(), angles.sin()


@dataclass
class RopeTables:
    """Float32 cos/sin [N, 1, 3n] of the rotated tokens of one forward and window kind, shared by its blocks."""

    vid: tuple[torch.Tensor, torch.Tensor]  # video tokens [L, 1, 3n] each
    txt: tuple[torch.Tensor, torch.Tensor] | None  # text tokens [l, 1, 3n] each, or None when text is not rotated


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of the first 2 * cos.shape[-1] channels of x [N, H, d], in float32."""
    rotated = 2 * cos.shape[-1]
    even, odd = x[..., :rotated].float().unflatten(-1, (-1, 2)).unbind(-1)  # [N, H, 3n] each
    pairs = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1)
    return torch.cat([pairs.flatten(-2).to(x.dtype), x[..., rotated:]], -1)


class RopeFrequencies(nn.Module):
    """Holds the `freqs` buffer under the checkpoint's name `rope.rope.freqs`."""

    freqs: torch.Tensor  # registered buffer

    def __init__(self, freqs: torch.Tensor):
        super().__init__()
        self.register_buffer("freqs", freqs.float(), persistent=True)


class Rope3d(nn.Module):
    """Rotates video q/k, and text q/k when the tables have text, with tables built once per forward."""

    rope: RopeFrequencies

    def tables(self, positions: RopePositions) -> RopeTables:
        """cos/sin of every rotated token at `positions`, on their device (the frequencies follow them there:
        with block offload they may still be in host memory)."""
        freqs = self.rope.freqs.to(positions.vid.device)
        txt = None if positions.txt is None else cos_sin(positions.txt, freqs)
        return RopeTables(vid=cos_sin(positions.vid, freqs), txt=txt)

    def forward(self, vid_q: torch.Tensor, vid_k: torch.Tensor, txt_q: torch.Tensor, txt_k: torch.Tensor,
                tables: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        vid_q, vid_k = rotate(vid_q, *tables.vid), rotate(vid_k, *tables.vid)
        if tables.txt is not None:
            txt_q, txt_k = rotate(txt_q, *tables.txt), rotate(txt_k, *tables.txt)
        return vid_q, vid_k, txt_q, txt_k


class MMRope3d(Rope3d):
    """3B rope: rotates video and text q/k (mmrope_positions gives both)."""

    def __init__(self, head_dim: int, rope_dim: int):
        super().__init__()
        freqs = lang_frequencies(rope_dim // 3)
        if 6 * len(freqs) > head_dim:
            raise ValueError(f"rope_dim {rope_dim} rotates {6 * len(freqs)} channels, more than head_dim {head_dim}")
        self.rope = RopeFrequencies(freqs)


class PixelRope3d(Rope3d):
    """7B rope: rotates video q/k only (pixel_positions gives no text positions)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.rope = RopeFrequencies(pixel_frequencies(head_dim // 2 // 3))
