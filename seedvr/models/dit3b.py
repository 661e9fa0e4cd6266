"""SeedVR2-3B DiT (official `models.dit_v2.nadit.NaDiT`, configs_3b).

Blocks 0..mm_layers-1 keep separate video/text weights (`.vid.`/`.txt.`), later blocks one shared set
(`.all.`). Rope is "mmrope3d" over video and text. The last block leaves text unmodulated and has no
text MLP; after it, `vid_out_norm` and an output modulation that reuses the blocks' attention
shift/scale slice of the time embedding (SEEDVR2_SPEC 2.5, 2.6, 2.10).
"""

from collections.abc import Sequence
from typing import Any

import torch

from seedvr.models.dit_base import NaDiTBase, check_choice
from seedvr.models.dit_block import BlockContext, MMWindowBlock
from seedvr.models.dit_layers import AdaSingle, PatchOut, RMSNorm, modulate_in
from seedvr.models.rope import MMRope3d, RopePositions, mmrope_positions
from seedvr.models.window import WindowPacking

WINDOW_METHODS = ("720pwin_by_size_bysize", "720pswin_by_size_bysize")


class NaDiT3B(NaDiTBase):
    """The 3B "dit_v2" NaDiT. Defaults are the released model; the kwargs are the official ones.

    Args:
        vid_in_channels / vid_out_channels: latent channels in (noise 16 | condition 16 | mask 1) / out.
        vid_dim, txt_dim: model width of both streams (must be equal).
        vid_out_norm: final norm ("fusedrms").
        txt_in_dim: text embedding width; txt_in_norm: accepted, unused for an int txt_in_dim (as upstream).
        emb_dim: time embedding width, 6 * vid_dim.
        heads, head_dim: attention heads. expand_ratio: MLP width factor.
        norm, qk_norm ("fusedrms"), norm_eps: RMS norms. ada ("single"): modulation kind.
        qk_bias: bias of the qkv projection. patch_size: [1, ph, pw].
        num_layers: blocks; mm_layers: leading blocks with separate video/text weights.
        mlp_type: "swiglu" or "normal". msa_type: accepted, must be "None".
        block_type: "mmdit_sr" (string or per-layer list). window: [nt, nh, nw] or per-layer list.
        window_method: per-layer list, or a shorter list cycled over the layers.
        rope_type ("mmrope3d"), rope_dim: rope budget; 6 * (rope_dim // 3 // 2) channels per head are rotated.
    """

    def __init__(self, vid_in_channels: int = 33, vid_out_channels: int = 16, vid_dim: int = 2560,
                 vid_out_norm: str = "fusedrms", txt_in_dim: int = 5120, txt_in_norm: str | None = "fusedln",
                 txt_dim: int = 2560, emb_dim: int = 15360, heads: int = 20, head_dim: int = 128,
                 expand_ratio: float = 4, norm: str = "fusedrms", norm_eps: float = 1e-5, ada: str = "single",
                 qk_bias: bool = False, qk_norm: str = "fusedrms", patch_size: Sequence[int] = (1, 2, 2),
                 num_layers: int = 32, mm_layers: int = 10, mlp_type: str = "swiglu",
                 msa_type: str | Sequence[str | None] | None = "None", block_type: str | Sequence[str] = "mmdit_sr",
                 window: Sequence[Any] = (4, 3, 3), window_method: str | Sequence[str] = WINDOW_METHODS,
                 rope_type: str = "mmrope3d", rope_dim: int = 128) -> None:
        super().__init__()
        check_choice("vid_out_norm", vid_out_norm, ["fusedrms"])
        check_choice("txt_in_norm", txt_in_norm, ["fusedln", "fusedrms", None])
        if not isinstance(txt_in_dim, int):
            raise ValueError(f"txt_in_dim must be an int (several text encoders are not supported); got {txt_in_dim!r}")
        check_choice("rope_type", rope_type, ["mmrope3d"])
        for value in [msa_type] if isinstance(msa_type, str) or msa_type is None else msa_type:
            check_choice("msa_type", value, ["None", None])
        if not 0 <= mm_layers <= num_layers:
            raise ValueError(f"mm_layers ({mm_layers}) must lie in [0, num_layers={num_layers}]")
        window_kinds = self._build_trunk(
            vid_in_channels=vid_in_channels, vid_dim=vid_dim, txt_in_dim=txt_in_dim, txt_dim=txt_dim, emb_dim=emb_dim,
            norm=norm, qk_norm=qk_norm, ada=ada, mlp_type=mlp_type, patch_size=patch_size, num_layers=num_layers,
            block_type=block_type, window=window, window_method=window_method)
        self.blocks = torch.nn.ModuleList([
            MMWindowBlock(dim=vid_dim, heads=heads, head_dim=head_dim, expand_ratio=expand_ratio, mlp_type=mlp_type,
                          qk_bias=qk_bias, eps=norm_eps, shared=i >= mm_layers, rope=MMRope3d(head_dim, rope_dim),
                          window_kind=window_kinds[i], txt_output=i < num_layers - 1,
                          txt_adaptive=i < num_layers - 1)
            for i in range(num_layers)
        ])
        self.vid_out_norm = RMSNorm(vid_dim, norm_eps, affine=True)
        self.vid_out_ada = AdaSingle(vid_dim, layers=("out",), kinds=("shift", "scale"))
        self.vid_out = PatchOut(vid_dim, vid_out_channels, self.patch_size)

    def rope_positions(self, packing: WindowPacking, vid_lengths: list[int]) -> RopePositions:
        return mmrope_positions(packing, vid_lengths)

    def output_head(self, vid: torch.Tensor, emb: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # The official output modulation reads the blocks' "attn" slice (slot 0) of the time embedding.
        return modulate_in(self.vid_out_norm(vid), self.vid_out_ada.modulation(emb, "out", slot=0), ctx.vid_lengths)
