"""One process's place in a sequence-parallel group, and the few collectives the models need.

Every rank of the group holds the whole model and calls the same model code in the same order; the
models ask this object to split their work (`shard_tokens` for the DiT, `run_temporal` for the VAE) and
never touch torch.distributed themselves. Tensors move over `group` (NCCL on CUDA, gloo on CPU);
small integer metadata (frame counts, shapes) over `meta_group`, a gloo group, so that planning a
transfer never waits for the GPU.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from seedvr.distributed.tokens import TokenShard
from seedvr.distributed.vae_context import run_context_parallel
from seedvr.models.causal_conv import TemporalCache


class SequenceParallel:
    """This process's `rank` among the `size` ranks of `group` (default: the default process group).

    meta_group carries the small CPU integer tensors (default: group itself, fine when that is gloo).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, meta_group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.meta_group = meta_group if meta_group is not None else group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, size={self.size})"

    # What the models call

    def shard_tokens(self, total: int) -> TokenShard:
        """How a stream of `total` DiT tokens is split over the ranks."""
        return TokenShard(self, total)

    def run_temporal(self, run: Callable[[Tensor, TemporalCache | None], Tensor], x: Tensor, chunk: int | None,
                     unit: int) -> Tensor:
        """The VAE's chunked pass `run(piece, cache)` over x (B, C, T, H, W), context parallel over time."""
        return run_context_parallel(self, run, x, chunk, unit)

    # Collectives

    def all_to_all(self, blocks: Tensor) -> Tensor:
        """[S, ...]: block j goes to rank j -> [S, ...]: block i came from rank i."""
        received = torch.empty_like(blocks, memory_format=torch.contiguous_format)
        dist.all_to_all_single(received, blocks.contiguous(), group=self.group)
        return received

    def exchange_rows(self, sends: list[Tensor], receive_rows: list[int]) -> list[Tensor]:
        """Uneven all-to-all of rows: sends[j] [n_j, ...] goes to rank j; returns one [receive_rows[i], ...]
        tensor per source rank i. Every rank must agree on the counts (they are not exchanged)."""
        data = torch.cat([s.flatten(1) for s in sends]).contiguous()
        received = data.new_empty(sum(receive_rows), data.shape[1])
        dist.all_to_all_single(received, data, receive_rows, [s.shape[0] for s in sends], group=self.group)
        row_shape = sends[0].shape[1:]
        return [part.view(rows, *row_shape) for part, rows in zip(received.split(receive_rows), receive_rows)]

    def all_gather(self, x: Tensor) -> Tensor:
        """[n, ...] on every rank -> [S, n, ...] (same n everywhere)."""
        gathered = x.new_empty(self.size * x.shape[0], *x.shape[1:])
        dist.all_gather_single(gathered, x.contiguous(), group=self.group)
        return gathered.unflatten(0, (self.size, x.shape[0]))

    def all_gather_rows(self, x: Tensor, dim: int) -> list[Tensor]:
        """x with any length along `dim` on every rank -> every rank's x, in rank order (pads to the longest)."""
        lengths = self.all_gather_ints([x.shape[dim]])
        longest = max(length for length, in lengths)
        padded = torch.cat([x, x.new_zeros(*x.shape[:dim], longest - x.shape[dim], *x.shape[dim + 1:])], dim)
        gathered = self.all_gather(padded.movedim(dim, 0))  # [S, longest, ...]
        return [part[:length].movedim(0, dim) for part, (length,) in zip(gathered, lengths)]

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """The same number of ints from every rank -> every rank's list, in rank order (over the meta group)."""
        mine = torch.tensor(values, dtype=torch.int64)
        gathered = torch.empty(self.size * len(values), dtype=torch.int64)
        dist.all_gather_single(gathered, mine, group=self.meta_group)
        return gathered.view(self.size, len(values)).tolist()

    def broadcast_from_first(self, x: Tensor | None, like: Tensor) -> Tensor:
        """Rank 0's tensor x on every rank. The others pass None and a tensor `like` with x's dtype, device
        and number of dimensions."""
        if self.rank == 0:
            assert x is not None  # rank 0 always passes its tensor
            shape = torch.tensor(x.shape, dtype=torch.int64)
        else:
            shape = torch.tensor([0] * like.dim(), dtype=torch.int64)
        dist.broadcast(shape, group=self.meta_group, group_src=0)
        if self.rank != 0:
            x = like.new_empty(shape.tolist())
        assert x is not None  # rank 0's own tensor, or the buffer just allocated
        x = x.contiguous()
        dist.broadcast(x, group=self.group, group_src=0)
        return x
