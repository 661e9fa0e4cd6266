"""SeedVR2-7B DiT (official `models.dit.nadit.NaDiT`, configs_7b; the "sharp" 7B shares the layout).

Every block keeps separate video/text weights (`.vid.`/`.txt.`), rope is the video-only pixel rope, the
last block processes text like the others (its text output is unused, so it is not computed) and
`vid_out` projects the last block's video stream directly (SEEDVR2_SPEC 2.5, 2.8.2, 2.10).
"""

from collections.abc import Sequence
from typing import Any

import torch

from seedvr.models.dit_base import NaDiTBase, check_choice
from seedvr.models.dit_block import BlockContext, MMWindowBlock
from seedvr.models.dit_layers import PatchOut
from seedvr.models.rope import PixelRope3d, RopePositions, pixel_positions
from seedvr.models.window import WindowPacking

WINDOW_METHODS = ("720pwin_by_size_bysize", "720pswin_by_size_bysize")


class NaDiT7B(NaDiTBase):
    """The 7B "dit" NaDiT. Defaults are the released model; the kwargs are the official ones.

    Args:
        vid_in_channels / vid_out_channels: latent channels in (noise 16 | condition 16 | mask 1) / out.
        vid_dim, txt_dim: model width of both streams (must be equal). txt_in_dim: text embedding width.
        emb_dim: time embedding width, 6 * vid_dim.
        heads, head_dim: attention heads. expand_ratio: MLP width factor.
        norm, qk_norm ("fusedrms"), norm_eps: RMS norms. ada ("single"): modulation kind.
        qk_bias: bias of the qkv projection. qk_rope: must be True (pixel rope on video q/k).
        patch_size: [1, ph, pw]. num_layers: blocks.
        shared_mlp, shared_qkv: must be False (every block has separate video/text weights).
        mlp_type: "normal" (GELU-tanh) or "swiglu". block_type: "mmdit_sr" (string or per-layer list).
        window: [nt, nh, nw] or per-layer list. window_method: per-layer list or a shorter list cycled.
    """

    def __init__(self, vid_in_channels: int = 33, vid_out_channels: int = 16, vid_dim: int = 3072,
                 txt_in_dim: int = 5120, txt_dim: int = 3072, emb_dim: int = 18432, heads: int = 24,
                 head_dim: int = 128, expand_ratio: float = 4, norm: str = "fusedrms", norm_eps: float = 1e-5,
                 ada: str = "single", qk_bias: bool = False, qk_rope: bool = True, qk_norm: str = "fusedrms",
                 patch_size: Sequence[int] = (1, 2, 2), num_layers: int = 36, shared_mlp: bool = False,
                 shared_qkv: bool = False, mlp_type: str = "normal", block_type: str | Sequence[str] = "mmdit_sr",
                 window: Sequence[Any] = (4, 3, 3), window_method: str | Sequence[str] = WINDOW_METHODS) -> None:
        super().__init__()
        check_choice("qk_rope", qk_rope, [True])
        check_choice("shared_mlp", shared_mlp, [False])
        check_choice("shared_qkv", shared_qkv, [False])
        window_kinds = self._build_trunk(
            vid_in_channels=vid_in_channels, vid_dim=vid_dim, txt_in_dim=txt_in_dim, txt_dim=txt_dim, emb_dim=emb_dim,
            norm=norm, qk_norm=qk_norm, ada=ada, mlp_type=mlp_type, patch_size=patch_size, num_layers=num_layers,
            block_type=block_type, window=window, window_method=window_method)
        self.blocks = torch.nn.ModuleList([
            MMWindowBlock(dim=vid_dim, heads=heads, head_dim=head_dim, expand_ratio=expand_ratio, mlp_type=mlp_type,
                          qk_bias=qk_bias, eps=norm_eps, shared=False, rope=PixelRope3d(head_dim),
                          window_kind=window_kinds[i], txt_output=i < num_layers - 1)
            for i in range(num_layers)
        ])
        self.vid_out = PatchOut(vid_dim, vid_out_channels, self.patch_size)

    def rope_positions(self, packing: WindowPacking, vid_lengths: list[int]) -> RopePositions:
        return pixel_positions(packing)

    def output_head(self, vid: torch.Tensor, emb: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return vid
