"""DiT tokens split over the ranks of a sequence-parallel group (SEEDVR2_SPEC 5).

A stream of N tokens (video or text) is zero-padded to S·n rows, n = ceil(N / S), and rank r keeps rows
[r·n, (r+1)·n). Everything row-wise (linear layers, norms, modulation, MLP) runs on those rows. Attention
needs whole sequences, so around it two all-to-alls trade rows for heads:

    gather_rows:  [n, ..., H, d]   this rank's rows, all heads  ->  [N, ..., H/S, d]  all rows, heads group r
    scatter_rows: [N, H/S, d]      all rows, heads group r      ->  [n, H, d]         this rank's rows, all heads

Head group r is heads [r·H/S, (r+1)·H/S), i.e. a contiguous block of the H·d features.
"""

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel


class TokenShard:
    def __init__(self, sp: "SequenceParallel", total: int):
        self.sp = sp
        self.total = total
        self.rows = -(-total // sp.size)  # n: rows per rank, padding included
        self.start = sp.rank * self.rows

    def local(self, x: Tensor) -> Tensor:
        """[N, ...] all tokens -> [n, ...] this rank's rows, zero rows where it runs past the end."""
        rows = x[self.start : self.start + self.rows]
        return _pad_rows(rows, self.rows)

    def local_lengths(self, lengths: list[int]) -> list[int]:
        """Per-sample token counts [B] -> how many of this rank's rows belong to each sample.

        The padding rows are counted to the last sample: they are modulated like it (harmless: they never
        enter attention and are dropped at the end), so that every row has modulation coefficients.
        """
        local, offset, stop = [], 0, self.start + self.rows
        for length in lengths:
            local.append(max(0, min(offset + length, stop) - max(offset, self.start)))
            offset += length
        local[-1] += self.rows - sum(local)
        return local

    def gather_rows(self, x: Tensor) -> Tensor:
        """[n, ..., H, d] -> [N, ..., H/S, d]: the whole sequence for this rank's group of heads."""
        size = self.sp.size
        blocks = x.unflatten(-2, (size, x.shape[-2] // size)).movedim(-3, 0)  # [S, n, ..., H/S, d]
        return self.sp.all_to_all(blocks).flatten(0, 1)[: self.total]  # block i = rows of rank i

    def scatter_rows(self, x: Tensor) -> Tensor:
        """[N, H/S, d] -> [n, H, d]: this rank's rows with every group of heads."""
        blocks = _pad_rows(x, self.sp.size * self.rows).unflatten(0, (self.sp.size, self.rows))  # block j: rank j
        return self.sp.all_to_all(blocks).movedim(0, -3).flatten(-3, -2)  # block i = heads group i

    def all_gather(self, x: Tensor) -> Tensor:
        """[n, C] this rank's rows -> [N, C] all rows (padding dropped)."""
        return self.sp.all_gather(x).flatten(0, 1)[: self.total]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
