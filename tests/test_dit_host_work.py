"""The DiT's per-forward work: windows, rope tables and the sdpa grouping are built once per forward and window
kind, never per block, and a block runs no host sync and creates no host tensor (issue 9, item 2)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seedvr.engine.checkpoint import load_strict
from seedvr.errors import CheckpointError
from seedvr.models.attention import sdpa_plan, varlen_attention
from seedvr.models.block_offload import BlockOffload
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.dit7b import NaDiT7B

aten = torch.ops.aten
# Ops that build windows, rope tables or index tensors, or read a tensor on the host (.item(), int(), bool():
# _local_scalar_dense; torch.tensor(data): lift_fresh). A CUDA block running any of them would either sync
# with the host or rebuild per layer what one forward shares.
HOST_WORK = {
    aten._local_scalar_dense, aten.lift_fresh, aten.arange, aten.linspace, aten.cos, aten.sin, aten.bincount,
    aten.argsort, aten.sort, aten.cumsum, aten.repeat_interleave, aten._unique2, aten.unique_dim,
}
TINY = dict(vid_dim=64, txt_dim=64, emb_dim=384, heads=2, head_dim=32, txt_in_dim=48)  # the goldens' tiny widths


class HostWork(TorchDispatchMode):
    """Counts the HOST_WORK ops a forward runs, separately inside and outside the DiT's blocks."""

    def __init__(self, blocks: torch.nn.ModuleList):
        super().__init__()
        self.inside = 0  # >0 while a block runs
        self.counts: dict[bool, Counter] = {True: Counter(), False: Counter()}
        self.handles = [hook for block in blocks for hook in (
            block.register_forward_pre_hook(lambda *_: self._enter()),
            block.register_forward_hook(lambda *_: self._leave()))]

    def _enter(self) -> None:
        self.inside += 1

    def _leave(self) -> None:
        self.inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_WORK:
            self.counts[self.inside > 0][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def inputs(grids: list[tuple[int, int, int]], txt_lengths: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = sum(t * h * w for t, h, w in grids)
    return dict(vid=torch.randn(tokens, 33, generator=generator),
                txt=torch.randn(sum(txt_lengths), TINY["txt_in_dim"], generator=generator),
                vid_shape=torch.tensor(grids), txt_shape=torch.tensor([[length] for length in txt_lengths]),
                timestep=torch.full((len(grids),), 1000.0))


def count_host_work(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[bool, Counter]:
    mode = HostWork(model.blocks)
    try:
        with torch.no_grad(), mode:
            model(**batch)
    finally:
        mode.remove()
    return mode.counts


@pytest.mark.parametrize("cls, extra", [(NaDiT3B, {"rope_dim": 32, "mm_layers": 2}), (NaDiT7B, {})])
def test_per_forward_work_does_not_grow_with_the_number_of_blocks(cls, extra):
    torch.manual_seed(0)
    batch = inputs([(3, 24, 28), (1, 10, 14)], [9, 6])  # two samples, several windows of unequal sizes
    counts = {layers: count_host_work(cls(**TINY, **extra, num_layers=layers).eval(), batch) for layers in (4, 8)}
    for layers, by_place in counts.items():
        assert by_place[True] == Counter(), f"{layers} blocks ran host work inside a block: {by_place[True]}"
    assert counts[4][False] == counts[8][False]
    # rope tables: one cos and one sin per window kind (two kinds) and rotated stream (3B: video and text), plus
    # the timestep sinusoid's
    streams = 2 if cls is NaDiT3B else 1
    assert counts[4][False]["cos"] == counts[4][False]["sin"] == 2 * streams + 1
    assert counts[4][False]["sort"] == 2 * 2  # pack_windows' argsort: once per window kind and sample


def test_the_old_per_call_grouping_counts_as_host_work():
    """The counter catches what the blocks no longer do: varlen attention without a plan groups the sequences
    itself, with a host read and host tensors on every call."""
    q = torch.randn(10, 2, 8)
    cu_seqlens = torch.tensor([0, 4, 8, 10], dtype=torch.int32)
    mode = HostWork(torch.nn.ModuleList())
    with mode:
        varlen_attention(q, q, q, cu_seqlens, 4, backend="sdpa")
    assert mode.counts[False]["lift_fresh"] > 0 and mode.counts[False]["arange"] > 0
    mode = HostWork(torch.nn.ModuleList())
    plan = sdpa_plan([4, 4, 2], heads=2)
    with mode:
        varlen_attention(q, q, q, cu_seqlens, 4, backend="sdpa", plan=plan)
    assert mode.counts[False] == Counter()


def test_a_plan_gives_the_same_attention_and_must_match_the_heads():
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 7, 5, 0, 3, 7]
    q, k, v = (torch.randn(sum(lengths), 3, 16, generator=generator) for _ in range(3))
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    planned = varlen_attention(q, k, v, cu_seqlens, 7, backend="sdpa", plan=sdpa_plan(lengths, heads=3))
    assert torch.equal(planned, varlen_attention(q, k, v, cu_seqlens, 7, backend="sdpa"))
    with pytest.raises(ValueError, match="built for 2 heads, q has 3"):
        varlen_attention(q, k, v, cu_seqlens, 7, backend="sdpa", plan=sdpa_plan(lengths, heads=2))


def test_a_plan_bounds_the_scores_of_each_sdpa_call():
    plan = sdpa_plan([100] * 10, heads=4)
    assert sum(group.rows.numel() for group in plan.groups) == 1000
    assert all(group.rows.numel() == group.length * (group.rows.numel() // group.length) for group in plan.groups)
    bounded = sdpa_plan([100] * 10, heads=4 * 10_000)  # the score bound then allows 6 sequences per call
    assert len(bounded.groups) > 1 and all(group.rows.numel() <= 700 for group in bounded.groups)


def test_loading_unequal_rope_frequencies_fails(tmp_path):
    model = NaDiT3B(**TINY, rope_dim=32, mm_layers=2, num_layers=4)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    load_strict(NaDiT3B(**TINY, rope_dim=32, mm_layers=2, num_layers=4), state, "same.pth")  # equal: loads
    state["blocks.2.attn.rope.rope.freqs"][0] += 1e-3
    with pytest.raises(CheckpointError, match=r"unequal\.pth: blocks\.2\.attn\.rope\.rope\.freqs differs from "
                                              r"blocks\.0\.attn\.rope\.rope\.freqs"):
        load_strict(NaDiT3B(**TINY, rope_dim=32, mm_layers=2, num_layers=4), state, "unequal.pth")


def test_block_offload_on_cpu_keeps_no_prefetch_and_the_same_output():
    torch.manual_seed(0)
    model = NaDiT7B(**TINY, num_layers=4).eval()
    batch = inputs([(2, 8, 12)], [5])
    with torch.no_grad():
        expected = model(**batch)
        model.block_offload = BlockOffload(model.blocks, torch.device("cpu"))
        try:
            assert torch.equal(model(**batch), expected)
            assert model.block_offload.copy_stream is None and model.block_offload.prefetched == {}
        finally:
            model.block_offload.close()
            model.block_offload = None
