"""What NaDiT3B and NaDiT7B share: checks of the official constructor kwargs, the forward skeleton and
the switch to a lower compute precision."""

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from seedvr.models.attention import sdpa_plan, select_backend
from seedvr.models.block_offload import BlockOffload
from seedvr.models.dit_block import BlockContext, MMWindowBlock, WindowKind, WindowLayout
from seedvr.models.dit_layers import MLP_TYPES, PatchIn, PatchOut, TimeEmbedding
from seedvr.models.rope import Rope3d, RopePositions
from seedvr.models.window import WindowPacking, check_window_method, pack_windows

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel

ROPE_FREQS_KEY = "blocks.{index}.attn.rope.rope.freqs"  # the checkpoint's per-block rope frequencies


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(allowed)}")


def _is_triple(value: object) -> bool:
    return isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, int) for v in value)


def per_layer_windows(window: Sequence[Any], num_layers: int) -> list[tuple[int, int, int]]:
    """`window`: one (nt, nh, nw) for every layer, or a list of num_layers of them."""
    if _is_triple(window):
        return [tuple(window)] * num_layers
    if isinstance(window, Sequence) and len(window) == num_layers and all(_is_triple(w) for w in window):
        return [tuple(w) for w in window]
    raise ValueError(f"window must be [nt, nh, nw] or a list of {num_layers} of them; got {window!r}")


def per_layer_methods(window_method: str | Sequence[str], num_layers: int) -> list[str]:
    """`window_method`: a string, a per-layer list, or a shorter list repeated cyclically over the layers."""
    methods = [window_method] if isinstance(window_method, str) else list(window_method)
    if not methods:
        raise ValueError("window_method must name at least one method")
    return [check_window_method(methods[i % len(methods)]) for i in range(num_layers)]


def check_block_types(block_type: str | Sequence[str], num_layers: int) -> None:
    types = [block_type] * num_layers if isinstance(block_type, str) else list(block_type)
    if len(types) != num_layers:
        raise ValueError(f"block_type lists {len(types)} layers, num_layers is {num_layers}")
    for value in types:
        check_choice("block_type", value, ["mmdit_sr"])


def check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    if not _is_triple(patch_size) or patch_size[0] != 1 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be [1, ph, pw] (no temporal patching); got {patch_size!r}")
    pt, ph, pw = patch_size
    return pt, ph, pw


class NaDiTBase(nn.Module):
    """Forward skeleton of the "native resolution" DiTs over packed variable-size samples.

    Subclasses build `vid_in`, `txt_in`, `emb_in`, `blocks`, `vid_out`, set `patch_size`, and define how
    rope positions come from a window packing and what runs between the last block and `vid_out`.
    """

    patch_size: tuple[int, int, int]
    blocks: nn.ModuleList  # the transformer blocks (MMWindowBlock), built by the subclass
    vid_out: PatchOut  # built by the subclass

    def __init__(self) -> None:
        super().__init__()
        self.attention_backend = "auto"  # "auto" | "sdpa" | "flash"
        # The official code casts q, k, v to bf16 before flash-attention even in a float32 model. Off: exact
        # float32 attention (the goldens' `vid_sample`); on: the official rounding (`vid_sample_bf16qkv`).
        self.round_qkv_to_bf16 = False
        self.block_offload: BlockOffload | None = None  # when set, the blocks visit the device in turn
        self.register_load_state_dict_pre_hook(_check_rope_frequencies)

    @property
    def heads(self) -> int:
        """Attention heads per block (sequence parallelism splits them over the ranks)."""
        return cast("Sequence[MMWindowBlock]", self.blocks)[0].attn.heads

    @property
    def width(self) -> int:
        """The model width (vid_dim): channels of every video token."""
        return self.vid_in.proj.out_features

    def _build_trunk(self, *, vid_in_channels: int, vid_dim: int, txt_in_dim: int, txt_dim: int, emb_dim: int,
                     norm: str, qk_norm: str, ada: str, mlp_type: str, patch_size: Sequence[int], num_layers: int,
                     block_type: str | Sequence[str], window: Sequence[Any],
                     window_method: str | Sequence[str]) -> list[WindowKind]:
        """Check the options both DiTs share and build what comes before the blocks (patch, text and time
        embeddings); return each layer's window kind (method, (nt, nh, nw))."""
        if txt_dim != vid_dim:
            raise ValueError(f"txt_dim ({txt_dim}) must equal vid_dim ({vid_dim})")
        if emb_dim != 6 * vid_dim:
            raise ValueError(f"emb_dim ({emb_dim}) must be 6 * vid_dim ({6 * vid_dim}) for ada 'single'")
        check_choice("norm", norm, ["fusedrms"])
        check_choice("qk_norm", qk_norm, ["fusedrms"])
        check_choice("ada", ada, ["single"])
        check_choice("mlp_type", mlp_type, list(MLP_TYPES))
        check_block_types(block_type, num_layers)
        kinds = list(zip(per_layer_methods(window_method, num_layers), per_layer_windows(window, num_layers)))
        self.patch_size = check_patch_size(patch_size)

        self.vid_in = PatchIn(vid_in_channels, vid_dim, self.patch_size)
        self.txt_in = torch.nn.Linear(txt_in_dim, txt_dim)
        self.emb_in = TimeEmbedding(vid_dim, emb_dim)
        return kinds

    def rope_positions(self, packing: WindowPacking, vid_lengths: list[int]) -> RopePositions:
        raise NotImplementedError

    def output_head(self, vid: torch.Tensor, emb: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.vid_in.proj.weight.dtype

    def to_compute_dtype(self, dtype: torch.dtype) -> "NaDiTBase":
        """Cast Linear weights and biases to `dtype`; rope freqs, modulation and norm weights stay float32.

        Equivalent to the official fp32 model under bf16 autocast. Call it after loading weights.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"compute dtype must be a floating dtype, got {dtype}")
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        return self

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, vid_shape: torch.Tensor, txt_shape: torch.Tensor,
                timestep: torch.Tensor, sp: "SequenceParallel | None" = None) -> torch.Tensor:
        """vid [sum T*H*W, C_in] packed latents, txt [sum l, txt_in_dim], vid_shape [B, 3] (T, H, W),
        txt_shape [B, 1], timestep [B] -> vid_sample [sum T*H*W, C_out] in the compute dtype.

        sp: split the tokens over this process's sequence-parallel group (seedvr.distributed, SEEDVR2_SPEC 5);
        every rank passes the whole input and receives the whole output.
        """
        shapes, txt_lengths = self._check_inputs(vid, txt, vid_shape, txt_shape, timestep)
        blocks = cast("Sequence[MMWindowBlock]", self.blocks)  # type-only view of the ModuleList
        heads = blocks[0].attn.heads
        if sp is not None and heads % sp.size:
            raise ValueError(f"sequence parallelism over {sp.size} ranks needs a head count divisible by it; "
                             f"this DiT has {heads} heads")
        pt, ph, pw = self.patch_size
        grids = [(t // pt, h // ph, w // pw) for t, h, w in shapes]
        dtype = self.compute_dtype

        # 1. Embed video patches, text and timestep
        vid = self.vid_in(vid.to(dtype), shapes)
        txt = self.txt_in(txt.to(dtype))
        emb = self.emb_in(timestep.reshape(-1).expand(len(shapes)), dtype).unflatten(-1, (-1, 2, 3))  # [B, D, 2, 3]

        # 2. Windows, rope tables and the attention grouping, once per window kind: the blocks only read them
        vid_lengths = [math.prod(grid) for grid in grids]
        backend = select_backend(self.attention_backend, vid.device, dtype)
        rope = cast(Rope3d, blocks[0].attn.rope)  # every block's frequencies are equal (_check_rope_frequencies)
        local_heads = heads if sp is None else heads // sp.size  # attention sees this rank's heads
        windows: dict[WindowKind, WindowLayout] = {}
        for kind in dict.fromkeys(block.window_kind for block in blocks):
            packing = pack_windows(*kind, grids, txt_lengths, device=vid.device)
            tables = rope.tables(self.rope_positions(packing, vid_lengths))
            plan = sdpa_plan(packing.seqlens, local_heads, vid.device) if backend == "sdpa" else None
            windows[kind] = WindowLayout(packing, tables, plan)
        ctx = BlockContext(vid_lengths, txt_lengths, windows, backend, round_qkv_to_bf16=self.round_qkv_to_bf16)
        if sp is not None:  # from here on, this rank's rows of both streams (zero-padded to a multiple of sp)
            shards = sp.shard_tokens(vid.shape[0]), sp.shard_tokens(txt.shape[0])
            vid, txt = shards[0].local(vid), shards[1].local(txt)
            ctx = dataclasses.replace(ctx, vid_lengths=shards[0].local_lengths(vid_lengths),
                                      txt_lengths=shards[1].local_lengths(txt_lengths), shards=shards)

        # 3. Blocks
        for index, block in enumerate(blocks):
            if self.block_offload is not None:
                self.block_offload.load(index)
            vid, txt = block(vid, txt, emb, ctx)

        # 4. Output projection and un-patching
        vid = self.output_head(vid, emb, ctx)
        if sp is None:
            return self.vid_out(vid, shapes)
        assert ctx.shards is not None  # set above whenever sp is given
        return self.vid_out.unpatchify(ctx.shards[0].all_gather(self.vid_out.proj(vid)), shapes)

    def _check_inputs(self, vid: torch.Tensor, txt: torch.Tensor, vid_shape: torch.Tensor, txt_shape: torch.Tensor,
                      timestep: torch.Tensor) -> tuple[list[tuple[int, int, int]], list[int]]:
        if vid_shape.dim() != 2 or vid_shape.shape[1] != 3 or vid_shape.shape[0] < 1:
            raise ValueError(f"vid_shape must be [B, 3] (T, H, W per sample); got {tuple(vid_shape.shape)}")
        if txt_shape.shape != (vid_shape.shape[0], 1):
            raise ValueError(f"txt_shape must be [B, 1] with B = {vid_shape.shape[0]}; got {tuple(txt_shape.shape)}")
        shapes = [tuple(s) for s in vid_shape.tolist()]
        txt_lengths = txt_shape[:, 0].tolist()
        pt, ph, pw = self.patch_size
        if any(min(s) < 1 for s in shapes) or any(t % pt or h % ph or w % pw for t, h, w in shapes):
            raise ValueError(f"latent sizes {shapes} are not positive multiples of the patch size {self.patch_size}")
        expected = (sum(math.prod(s) for s in shapes), self.vid_in.proj.in_features // math.prod(self.patch_size))
        if vid.shape != expected:
            raise ValueError(f"vid has shape {tuple(vid.shape)}; vid_shape {shapes} needs {list(expected)}")
        if txt.shape != (sum(txt_lengths), self.txt_in.in_features):
            raise ValueError(f"txt has shape {tuple(txt.shape)}; txt_shape needs "
                             f"[{sum(txt_lengths)}, {self.txt_in.in_features}]")
        if timestep.numel() not in (1, len(shapes)) or timestep.dim() > 1:
            raise ValueError(f"timestep must be a scalar or [B={len(shapes)}]; got {tuple(timestep.shape)}")
        return shapes, txt_lengths


def _check_rope_frequencies(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load-time check that every block's rope frequencies are equal: the forward builds its rope tables once,
    from the first block's. The official checkpoints hold the same deterministic values in every block."""
    blocks = cast(NaDiTBase, module).blocks
    keys = [prefix + ROPE_FREQS_KEY.format(index=index) for index in range(len(blocks))]
    present = [(key, state_dict[key]) for key in keys if key in state_dict and not state_dict[key].is_meta]
    for key, freqs in present[1:]:
        first_key, first = present[0]
        if freqs.shape != first.shape or not torch.equal(freqs.to(first.device, first.dtype), first):
            raise ValueError(f"{key} differs from {first_key}: this DiT needs the same rope frequencies in every "
                             f"block (it computes its rope tables once per forward)")
