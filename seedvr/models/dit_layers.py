"""Layers shared by the 3B and 7B DiTs: norm, vid/txt weight pairs, modulation, time embedding, patching, MLPs.

Precision (SEEDVR2_SPEC 2.6, 2.7, 2.12): activations flow in the dtype of the Linear weights (float32, or
bfloat16 after `to_compute_dtype`); norm statistics, modulation sums and the timestep sinusoid are float32,
results are rounded back to the activation dtype exactly where the official autocast run rounds them.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class RMSNorm(nn.Module):
    """apex FusedRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, rounded, then times the (rounded) weight."""

    def __init__(self, dim: int, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed if self.weight is None else normed * self.weight.to(x.dtype)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class MM(nn.Module, Generic[ModuleT]):
    """One module per stream under the checkpoint's names `.vid.` and `.txt.`, or a single shared `.all.`.

    `vid_only` drops the text module (only meaningful without sharing: a shared `.all.` always exists).
    """

    all: ModuleT
    vid: ModuleT
    txt: ModuleT | None

    def __init__(self, make: Callable[[], ModuleT], shared: bool, vid_only: bool = False) -> None:
        super().__init__()
        self.shared = shared
        if shared:
            self.all = make()
        else:
            self.vid = make()
            self.txt = None if vid_only else make()

    @property
    def for_vid(self) -> ModuleT:
        return self.all if self.shared else self.vid

    @property
    def for_txt(self) -> ModuleT:
        module = self.all if self.shared else self.txt
        if module is None:
            raise RuntimeError("this MM module has no text weights (vid_only)")
        return module


@dataclass
class Modulation:
    """Float32 per-sample coefficients [B, D] = time-embedding slice + learned parameter."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None


class AdaSingle(nn.Module):
    """Learned parts of the "single" adaptive modulation: `{layer}_{shift,scale,gate}` of shape [D].

    The time embedding [B, 6D] is read interleaved as [B, D, 2, 3]: slot 0 = attn, 1 = mlp; last axis =
    shift, scale, gate (SEEDVR2_SPEC 2.6).
    """

    SLOTS = {"attn": 0, "mlp": 1}

    def __init__(self, dim: int, layers: tuple[str, ...] = ("attn", "mlp"),
                 kinds: tuple[str, ...] = ("shift", "scale", "gate")):
        super().__init__()
        for layer in layers:
            for kind in kinds:
                init = torch.randn(dim) / dim**0.5 + (1.0 if kind == "scale" else 0.0)
                self.register_parameter(f"{layer}_{kind}", nn.Parameter(init))

    def modulation(self, emb: torch.Tensor, layer: str, slot: int | None = None) -> Modulation:
        """emb [B, D, 2, 3] -> this layer's coefficients; `slot` overrides which embedding slice is read."""
        coeffs = emb[:, :, self.SLOTS[layer] if slot is None else slot].float()  # [B, D, 3]
        gate = getattr(self, f"{layer}_gate", None)
        return Modulation(shift=coeffs[..., 0] + getattr(self, f"{layer}_shift").float(),
                          scale=coeffs[..., 1] + getattr(self, f"{layer}_scale").float(),
                          gate=None if gate is None else coeffs[..., 2] + gate.float())


def modulate_in(x: torch.Tensor, mod: Modulation, lengths: list[int]) -> torch.Tensor:
    """In place: x <- x * scale + shift per sample (rows split by `lengths`), rounded after each op."""
    for b, rows in enumerate(x.split(lengths)):
        rows.mul_(mod.scale[b]).add_(mod.shift[b])
    return x


def modulate_out(x: torch.Tensor, mod: Modulation, lengths: list[int]) -> torch.Tensor:
    """In place: x <- x * gate per sample."""
    assert mod.gate is not None  # only the output head's shift/scale modulation lacks a gate, and it never gates
    for b, rows in enumerate(x.split(lengths)):
        rows.mul_(mod.gate[b])
    return x


class TimeEmbedding(nn.Module):
    """Timestep -> [B, 6D]: 256-d sinusoid [sin | cos], Linear-SiLU-Linear-SiLU-Linear."""

    def __init__(self, dim: int, out_dim: int, sinusoid_dim: int = 256):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.proj_in = nn.Linear(sinusoid_dim, dim)
        self.proj_hid = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = get_timestep_embedding(timestep.float(), self.sinusoid_dim, flip_sin_to_cos=False,
                                     downscale_freq_shift=0).to(dtype)
        emb = F.silu(self.proj_in(emb))
        emb = F.silu(self.proj_hid(emb))
        return self.proj_out(emb)


class PatchIn(nn.Module):
    """Packed latent tokens [sum T*H*W, C] -> patch tokens [sum T*(H/ph)*(W/pw), D]; patch vector (pt, ph, pw, c)."""

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * math.prod(patch_size), dim)

    def forward(self, vid: torch.Tensor, shapes: list[tuple[int, int, int]]) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        patches = []
        for (t, h, w), x in zip(shapes, vid.split([math.prod(s) for s in shapes])):
            x = x.reshape(t // pt, pt, h // ph, ph, w // pw, pw, -1).permute(0, 2, 4, 1, 3, 5, 6)
            patches.append(x.reshape((t // pt) * (h // ph) * (w // pw), -1))
        return self.proj(torch.cat(patches))


class PatchOut(nn.Module):
    """Patch tokens [sum L, D] -> packed latent tokens [sum T*H*W, C_out] (inverse layout of PatchIn)."""

    def __init__(self, dim: int, out_channels: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, out_channels * math.prod(patch_size))

    def forward(self, vid: torch.Tensor, shapes: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.unpatchify(self.proj(vid), shapes)

    def unpatchify(self, vid: torch.Tensor, shapes: list[tuple[int, int, int]]) -> torch.Tensor:
        """Projected patch tokens [sum L, pt*ph*pw*C_out] -> packed latent tokens [sum T*H*W, C_out]."""
        pt, ph, pw = self.patch_size
        pixels = []
        for (t, h, w), x in zip(shapes, vid.split([math.prod(s) // math.prod(self.patch_size) for s in shapes])):
            x = x.view(t // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 3, 1, 4, 2, 5, 6)
            pixels.append(x.reshape(t * h * w, -1))
        return torch.cat(pixels)


class SwiGLU(nn.Module):
    """3B MLP: proj_out(silu(proj_in_gate(x)) * proj_in(x)), hidden rounded up to a multiple of 256."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = 256 * math.ceil(int(2 * dim * expand_ratio / 3) / 256)
        self.proj_in_gate = nn.Linear(dim, hidden, bias=False)
        self.proj_in = nn.Linear(dim, hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.silu(self.proj_in_gate(x)) * self.proj_in(x))


class GeluMLP(nn.Module):
    """7B MLP ("normal"): proj_out(gelu_tanh(proj_in(x))), hidden = expand_ratio * dim."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.proj_in = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


MLP_TYPES = {"swiglu": SwiGLU, "normal": GeluMLP}
