"""The joint video/text window-attention block ("mmdit_sr") of both DiTs (SEEDVR2_SPEC 2.5, 2.8)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from seedvr.models.attention import SdpaPlan, varlen_attention
from seedvr.models.dit_layers import MLP_TYPES, MM, AdaSingle, RMSNorm, modulate_in, modulate_out
from seedvr.models.rope import RopeTables
from seedvr.models.window import WindowPacking

if TYPE_CHECKING:
    from seedvr.distributed.tokens import TokenShard

WindowKind = tuple[str, tuple[int, int, int]]  # (window_method, num_windows)


@dataclass
class WindowLayout:
    """What the blocks of one window kind share in one forward: built once, before the first block."""

    packing: WindowPacking
    rope: RopeTables
    sdpa: SdpaPlan | None  # the sdpa backend's grouping of the windows; None when flash-attention runs


@dataclass
class BlockContext:
    """What every block of one forward call shares; windows are built once per window kind.

    Under sequence parallelism the blocks hold only this rank's rows of each stream: the lengths are then
    the per-sample row counts of those rows, and `shards` says how the (video, text) streams are split.
    """

    vid_lengths: list[int]  # patch tokens per sample
    txt_lengths: list[int]  # text tokens per sample
    windows: dict[WindowKind, WindowLayout]
    attention_backend: str  # the concrete backend, "flash" or "sdpa"
    shards: "tuple[TokenShard, TokenShard] | None" = None
    round_qkv_to_bf16: bool = False  # see NaDiTBase.round_qkv_to_bf16


class WindowAttention(nn.Module):
    """qkv projection -> per-head q/k RMSNorm -> rope -> varlen attention over windows+text -> out projection.

    Each window of a sample attends jointly with all the sample's text; a text token's output is the
    mean of its outputs over the sample's windows.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_bias: bool, eps: float, shared: bool,
                 rope: nn.Module):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.proj_qkv = MM(lambda: nn.Linear(dim, 3 * heads * head_dim, bias=qk_bias), shared)
        self.proj_out = MM(lambda: nn.Linear(heads * head_dim, dim), shared)
        self.norm_q = MM(lambda: RMSNorm(head_dim, eps, affine=True), shared)
        self.norm_k = MM(lambda: RMSNorm(head_dim, eps, affine=True), shared)
        self.rope = rope

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, layout: WindowLayout, backend: str, need_txt: bool = True,
                shards: "tuple[TokenShard, TokenShard] | None" = None,
                round_qkv_to_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # [L, D] -> [L, 3, H, d]: features laid out (3, heads, head_dim)
        vid_qkv = self.proj_qkv.for_vid(vid).unflatten(-1, (3, self.heads, self.head_dim))
        txt_qkv = self.proj_qkv.for_txt(txt).unflatten(-1, (3, self.heads, self.head_dim))
        if shards is not None:  # this rank's rows, all heads -> all rows, this rank's heads
            vid_qkv, txt_qkv = shards[0].gather_rows(vid_qkv), shards[1].gather_rows(txt_qkv)
        vid_out, txt_out = self.attend(vid_qkv, txt_qkv, layout, backend, need_txt, round_qkv_to_bf16)
        if shards is not None:  # all rows, this rank's heads -> this rank's rows, all heads
            vid_out = shards[0].scatter_rows(vid_out)
            txt_out = shards[1].scatter_rows(txt_out) if txt_out is not None else None  # None iff not need_txt
        vid_out = self.proj_out.for_vid(vid_out.flatten(1))
        txt_out = self.proj_out.for_txt(txt_out.flatten(1)) if txt_out is not None else None
        return vid_out, txt_out

    def attend(self, vid_qkv: torch.Tensor, txt_qkv: torch.Tensor, layout: WindowLayout, backend: str,
               need_txt: bool, round_qkv_to_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full-sequence qkv [L, 3, H, d], [l, 3, H, d] -> attention outputs [L, H, d], [l, H, d] (or None)."""
        packing = layout.packing
        vid_q, vid_k, vid_v = vid_qkv.unbind(1)
        txt_q, txt_k, txt_v = txt_qkv.unbind(1)
        vid_q, vid_k = self.norm_q.for_vid(vid_q), self.norm_k.for_vid(vid_k)
        txt_q, txt_k = self.norm_q.for_txt(txt_q), self.norm_k.for_txt(txt_k)
        vid_q, vid_k, txt_q, txt_k = self.rope(vid_q, vid_k, txt_q, txt_k, layout.rope)
        q, k, v = packing.pack(vid_q, txt_q), packing.pack(vid_k, txt_k), packing.pack(vid_v, txt_v)  # [N, H, d]
        if round_qkv_to_bf16:  # the official bf16 cast before flash-attention, kept in a float32 model
            q, k, v = (tensor.to(torch.bfloat16).to(q.dtype) for tensor in (q, k, v))
        out = varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, backend, layout.sdpa)  # [N, H, d]
        if round_qkv_to_bf16:  # flash-attention returns bf16; the official casts it back to q's dtype
            out = out.to(torch.bfloat16).to(q.dtype)
        return packing.unpack(out, need_txt)


class MMWindowBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), then x + gate * mlp(modulate(norm(x))), for both streams.

    `txt_output=False` (last block) skips everything whose only consumer is the text output.
    `txt_adaptive=False` (3B last block): text enters attention normalised but unmodulated, and the block's
    MLP and modulation exist for video only.
    """

    def __init__(self, *, dim: int, heads: int, head_dim: int, expand_ratio: float, mlp_type: str, qk_bias: bool,
                 eps: float, shared: bool, rope: nn.Module, window_kind: WindowKind, txt_output: bool = True,
                 txt_adaptive: bool = True):
        super().__init__()
        if txt_output and not txt_adaptive:
            raise ValueError("a block without text modulation cannot produce a text output")
        self.window_kind = window_kind
        self.txt_output, self.txt_adaptive = txt_output, txt_adaptive
        self.attn_norm = RMSNorm(dim, eps, affine=False)
        self.mlp_norm = RMSNorm(dim, eps, affine=False)
        self.attn = WindowAttention(dim, heads, head_dim, qk_bias, eps, shared, rope)
        self.mlp = MM(lambda: MLP_TYPES[mlp_type](dim, expand_ratio), shared, vid_only=not txt_adaptive)
        self.ada = MM(lambda: AdaSingle(dim), shared, vid_only=not txt_adaptive)

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, emb: torch.Tensor,
                ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vid [L, D], txt [l, D], emb [B, D, 2, 3] -> new vid, new txt (None when txt_output is off)."""
        layout = ctx.windows[self.window_kind]
        vid_attn = self.ada.for_vid.modulation(emb, "attn")
        vid_mlp = self.ada.for_vid.modulation(emb, "mlp")

        # 1. Joint window attention
        attn_vid = modulate_in(self.attn_norm(vid), vid_attn, ctx.vid_lengths)
        attn_txt = self.attn_norm(txt)
        if self.txt_adaptive:
            txt_attn = self.ada.for_txt.modulation(emb, "attn")
            attn_txt = modulate_in(attn_txt, txt_attn, ctx.txt_lengths)
        attn_vid, attn_txt = self.attn(attn_vid, attn_txt, layout, ctx.attention_backend,
                                       need_txt=self.txt_output, shards=ctx.shards,
                                       round_qkv_to_bf16=ctx.round_qkv_to_bf16)
        vid = vid + modulate_out(attn_vid, vid_attn, ctx.vid_lengths)

        # 2. MLP
        mlp_vid = self.mlp.for_vid(modulate_in(self.mlp_norm(vid), vid_mlp, ctx.vid_lengths))
        vid = vid + modulate_out(mlp_vid, vid_mlp, ctx.vid_lengths)
        if not self.txt_output:
            return vid, None

        txt_mlp = self.ada.for_txt.modulation(emb, "mlp")
        txt = txt + modulate_out(attn_txt, txt_attn, ctx.txt_lengths)
        mlp_txt = self.mlp.for_txt(modulate_in(self.mlp_norm(txt), txt_mlp, ctx.txt_lengths))
        return vid, txt + modulate_out(mlp_txt, txt_mlp, ctx.txt_lengths)
