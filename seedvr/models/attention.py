"""Varlen attention: non-causal softmax attention inside each packed sequence (block-diagonal).

q, k, v are `[N_total, H, d]`, sequences laid end to end and delimited by `cu_seqlens` (int32 prefix
sums, `[n_seq + 1]`). The scale is 1/sqrt(d), as the official calls never pass one (SEEDVR2_SPEC 2.8.3).

Backends:
- "flash": flash-attn's `flash_attn_varlen_func`; needs the package and CUDA tensors. float32 inputs are
  cast to bf16 and back, as the official code does.
- "sdpa": exact pure PyTorch. Sequences of equal length are stacked and sent through one
  `scaled_dot_product_attention` call per distinct length (windows mostly share a few sizes). That
  grouping (`SdpaPlan`) is host work with a device sync; the DiT builds it once per forward and window kind
  and passes it to every block, so a block runs no host sync and creates no host tensor.
- "auto": flash for bf16/fp16 CUDA tensors when flash-attn is installed, else sdpa (so a float32 model
  keeps float32 attention).
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa")
HALF_DTYPES = (torch.float16, torch.bfloat16)
SDPA_MAX_SCORES = 1 << 28  # attention-matrix elements per SDPA call; bounds the math kernel's memory


@functools.cache
def _flash_varlen_func() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func  # the optional CUDA-only extra
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_usable() -> bool:
    return _flash_varlen_func() is not None and torch.cuda.is_available()


def available_backends() -> list[str]:
    """The concrete backends this process can run ("sdpa" always; "flash" with flash-attn and CUDA)."""
    return (["flash"] if _flash_usable() else []) + ["sdpa"]


def resolve_backend(name: str | None) -> str:
    """"auto"/None -> the best available backend; "flash"/"sdpa" -> itself if available, else ValueError."""
    name = "auto" if name is None else name
    if name == "auto":
        return available_backends()[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not available here (needs flash-attn and CUDA); "
                         f"available: {', '.join(['auto', *available_backends()])}")
    return name


def select_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ("flash" or "sdpa") `name` runs for q, k, v on `device` in `dtype`: "auto" keeps
    float32 and non-CUDA tensors on sdpa; an explicit choice is taken as it is."""
    resolved = resolve_backend(name)
    if resolved == "flash" and name != "flash" and (device.type != "cuda" or dtype not in HALF_DTYPES):
        return "sdpa"
    return resolved


@dataclass(frozen=True)
class SdpaGroup:
    """Packed sequences of one length, attended in one SDPA call."""

    length: int
    rows: torch.Tensor  # [n_seq * length] int64, their packed rows, sequence after sequence


@dataclass(frozen=True)
class SdpaPlan:
    """How the sdpa backend batches a packing's sequences for q, k, v of `heads` heads."""

    heads: int
    groups: list[SdpaGroup]


def sdpa_plan(seqlens: Sequence[int], heads: int, device: torch.device | str = "cpu") -> SdpaPlan:
    """Sequences (lengths in packed order) grouped by length, at most SDPA_MAX_SCORES attention scores per
    group; the row indices are built on the host and reach the device in one copy."""
    starts_by_length: dict[int, list[int]] = {}
    start = 0
    for length in seqlens:
        starts_by_length.setdefault(length, []).append(start)
        start += length
    batches: list[tuple[int, torch.Tensor]] = []
    for length, starts in starts_by_length.items():
        if length == 0:
            continue
        per_call = max(1, SDPA_MAX_SCORES // (heads * length * length))
        for first in range(0, len(starts), per_call):
            group = torch.tensor(starts[first:first + per_call])
            batches.append((length, (group[:, None] + torch.arange(length)).flatten()))  # [n_seq * length]
    if not batches:
        return SdpaPlan(heads, [])
    rows = torch.cat([group_rows for _, group_rows in batches]).to(device).split([r.numel() for _, r in batches])
    return SdpaPlan(heads, [SdpaGroup(length, group_rows) for (length, _), group_rows in zip(batches, rows)])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str | None = None, plan: SdpaPlan | None = None) -> torch.Tensor:
    """Attention of every packed sequence with itself; returns `[N_total, H, d]` in q's dtype.

    plan: the sdpa grouping of these sequences, built once by the caller (`sdpa_plan`); without it the sdpa
    backend builds it here from `cu_seqlens` (a device sync and host work on every call).
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [N, H, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    name = select_backend(backend, q.device, q.dtype)
    if name == "flash":
        if not q.is_cuda:
            raise ValueError("attention backend 'flash' needs CUDA tensors; use 'sdpa' on this device")
        return _flash_attention(q, k, v, cu_seqlens, max_seqlen)
    if plan is None:
        plan = sdpa_plan(cu_seqlens.diff().tolist(), q.shape[1], q.device)
    elif plan.heads != q.shape[1]:
        raise ValueError(f"the sdpa plan was built for {plan.heads} heads, q has {q.shape[1]}")
    return _sdpa_attention(q, k, v, plan)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    flash_varlen = _flash_varlen_func()
    assert flash_varlen is not None  # varlen_attention only picks "flash" when flash-attn imported
    dtype = q.dtype if q.dtype in HALF_DTYPES else torch.bfloat16
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens_q=cu_seqlens,
                       cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return out.to(q.dtype)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SdpaPlan) -> torch.Tensor:
    out = torch.empty_like(q)
    for group in plan.groups:
        # [n_seq * length, H, d] -> (n_seq, H, length, d)
        qs, ks, vs = (x.index_select(0, group.rows).unflatten(0, (-1, group.length)).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs)  # (n_seq, H, length, d)
        out.index_copy_(0, group.rows, o.transpose(1, 2).flatten(0, 1))
    return out
