"""The causal VAE context parallel over time: pieces of the clip on different ranks, exact.

A clip is cut into pieces along time (`plan_pieces`): the first piece holds frame 0 plus whole latent-frame
units, later pieces whole units, none longer than the VAE's temporal chunk (the memory bound of the
single-process pass) and at least one per rank while the clip has units to share. Pieces are dealt round-robin:
round k runs pieces k·S .. k·S + S - 1, piece k·S + r on rank r, all ranks at once. A rank without a piece
in the last round runs a one-frame stand-in (its result is dropped) so that every rank makes the same
sequence of collective calls.

Each causal conv works on the time-extended stream P = [2·pt copies of frame 0, frame 0, frame 1, ...];
window w reads P[w·st, w·st + kt). A piece starting at stream position a computes the windows no earlier
piece could finish, so it needs the frames P[st·W, a) before it, W = (a - kt) // st + 1 (at most kt - 1
frames: the `kt - st` halo for aligned pieces). `ContextParallelCache.extend` gets them in one all-to-all
per conv, straight from the ranks that hold them: earlier pieces of the same round, or the previous round
(every rank keeps the last kt - 1 frames of its previous piece per conv). A piece shorter than the halo
thus takes frames from two ranks back at no extra latency. Global positions come from one small gather of
the pieces' frame counts per conv; the first piece alone replicates frame 0 and removes the upsamplers'
head, exactly as the first chunk of the single-process pass. The result equals that pass up to float
reduction order (convolutions over different frame counts may pick different kernels).

Outputs are gathered after every round, so every rank returns the whole result. A clip that is a single
piece (an image, a very short clip) runs on rank 0 alone and is broadcast.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from seedvr.models.causal_conv import CausalConv3d, TemporalCache, join_frames

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel


def plan_pieces(frames: int, chunk: int | None, unit: int, ranks: int) -> list[int]:
    """Frame counts of the pieces of a clip of `frames` = 1 + k·unit frames, in time order.

    chunk: most frames per piece after the first (a multiple of unit; None: no limit). As many pieces as
    the chunk limit requires, and at least one per rank while there are units to share; units are spread
    evenly, the first piece (which also holds frame 0) getting the fewest.
    """
    units, rest = divmod(frames - 1, unit)
    if frames < 1 or rest:
        raise ValueError(f"a clip of {frames} frames is not 1 + k·{unit} frames")
    per_piece = units if chunk is None else chunk // unit
    needed = math.ceil(units / per_piece) if units else 1
    count = max(needed, min(ranks, units + 1))
    base, extra = divmod(units, count)
    sizes = [base] * (count - extra) + [base + 1] * extra  # units per piece, the first among the smallest
    return [1 + sizes[0] * unit] + [size * unit for size in sizes[1:]]


def run_context_parallel(sp: "SequenceParallel", run: Callable[[Tensor, TemporalCache | None], Tensor], x: Tensor,
                         chunk: int | None, unit: int) -> Tensor:
    """`run(piece, cache)` over x (B, C, T, H, W) cut into pieces over the ranks -> the whole output on every rank."""
    pieces = plan_pieces(x.size(2), chunk, unit, sp.size)
    if len(pieces) == 1:
        return sp.broadcast_from_first(run(x, None) if sp.rank == 0 else None, like=x)

    bounds = [0, *torch.tensor(pieces).cumsum(0).tolist()]
    cache = ContextParallelCache(sp)
    outputs: list[Tensor] = []
    for first in range(0, len(pieces), sp.size):
        index = first + sp.rank
        real = index < len(pieces)
        piece = x[:, :, bounds[index] : bounds[index + 1]] if real else x[:, :, :1]  # a one-frame stand-in
        cache.start_piece(first=index == 0, real=real)
        out = run(piece, cache)
        out = out if real else out[:, :, :0]
        outputs.extend(part for part in sp.all_gather_rows(out, dim=2) if part.size(2))
    return torch.cat(outputs, dim=2)


Interval = tuple[int, int]  # [start, stop) of stream positions


@dataclass
class _ConvHistory:
    """What one conv remembers from the previous round."""

    end: int = 0  # stream frames before the current round
    previous: list[Interval] = field(default_factory=list)  # each rank's piece of the previous round
    kept: Tensor | None = None  # the last frames of this rank's previous piece (they end where it ends)


class ContextParallelCache(TemporalCache):
    """The `TemporalCache` of one rank's pieces: the frames before a piece come from the other ranks."""

    def __init__(self, sp: "SequenceParallel") -> None:
        super().__init__()
        self.sp = sp
        self.real = True
        self._history: dict[nn.Module, _ConvHistory] = {}

    def start_piece(self, first: bool, real: bool) -> None:
        """Before each round: is this rank's piece the clip's first one; is it real or a stand-in."""
        self.is_first_chunk = first or not real
        self.real = real

    def next_chunk(self) -> None:
        raise RuntimeError("a context-parallel cache advances with start_piece")

    def extend(self, layer: CausalConv3d, x: Tensor) -> Tensor:
        kt, st = layer.kernel_size[0], layer.stride[0]
        if kt == 1 and st == 1:
            return x  # one-frame windows: nothing crosses a piece boundary
        if self.is_first_chunk:
            head = layer.first_frame_padding(x)
            x = x if head is None else join_frames([head, x], layer.memory_format)

        # This round's pieces as stream intervals, and the interval each piece needs before it.
        history = self._history.setdefault(layer, _ConvHistory())
        counts = [n for n, in self.sp.all_gather_ints([x.size(2) if self.real else 0])]
        starts = [history.end + sum(counts[:r]) for r in range(self.sp.size)]
        current = [(start, start + count) for start, count in zip(starts, counts)]
        needs = [_frames_before(start, kt, st) if stop > start > 0 else (start, start) for start, stop in current]

        if any(stop > start for start, stop in needs):
            x = join_frames([*self._receive_head(x, history, current, needs), x], layer.memory_format)

        keep = min(kt - 1, counts[self.sp.rank])
        history.kept = x[:, :, x.size(2) - keep :].clone() if self.real else None
        history.previous = current
        history.end = current[-1][1]
        return x

    def _receive_head(self, x: Tensor, history: _ConvHistory, current: list[Interval],
                      needs: list[Interval]) -> list[Tensor]:
        """One all-to-all: every rank sends the frames it holds of every other rank's need."""
        me = self.sp.rank

        def segments(source: int, destination: int) -> list[tuple[Interval, bool]]:
            """(stream interval, from the previous round?) that `source` holds of `destination`'s need."""
            held = [(history.previous[source], True)] if history.previous else []
            held.append((current[source], False))
            found = [(_overlap(piece, needs[destination]), old) for piece, old in held]
            return [(interval, old) for interval, old in found if interval[1] > interval[0]]

        sends = []
        for destination in range(self.sp.size):
            mine = [self._own_frames(x, history, current[me][0], interval, old)
                    for interval, old in segments(me, destination)]
            sends.append(torch.cat(mine, dim=2) if mine else x[:, :, :0])
        incoming = [[interval for interval, _ in segments(source, me)] for source in range(self.sp.size)]
        blocks = self.sp.exchange_rows([frames.movedim(2, 0) for frames in sends],
                                       [sum(stop - start for start, stop in parts) for parts in incoming])

        pieces = []  # (interval, frames) of the head, from every source
        for parts, block in zip(incoming, blocks):
            block = block.movedim(0, 2)
            offset = 0
            for start, stop in parts:
                pieces.append(((start, stop), block[:, :, offset : offset + stop - start]))
                offset += stop - start
        pieces.sort(key=lambda piece: piece[0])
        bounds = [needs[me][0]] + [bound for interval, _ in pieces for bound in interval] + [needs[me][1]]
        if bounds[0::2] != bounds[1::2]:  # not one gapless run over the need
            raise RuntimeError(f"context-parallel VAE: frames {needs[me]} before this piece are not all held "
                               f"by the ranks (got {[interval for interval, _ in pieces]}); pieces are too "
                               f"short for this kernel")
        return [frames for _, frames in pieces]

    def _own_frames(self, x: Tensor, history: _ConvHistory, x_start: int, interval: Interval, old: bool) -> Tensor:
        """This rank's frames of a stream interval: from its current piece x (starting at x_start) or from the
        kept end of its previous piece."""
        start, stop = interval
        if old:
            assert history.kept is not None  # an old segment comes from a real previous piece, which kept frames
            kept_start = history.previous[self.sp.rank][1] - history.kept.size(2)
            if start < kept_start:
                raise RuntimeError(f"context-parallel VAE: frames from {start} are needed but only those from "
                                   f"{kept_start} were kept")
            return history.kept[:, :, start - kept_start : stop - kept_start]
        return x[:, :, start - x_start : stop - x_start]


def _frames_before(start: int, kt: int, st: int) -> Interval:
    """The stream interval a piece starting at `start` needs before it: from the first unfinished window."""
    windows = (start - kt) // st + 1 if start >= kt else 0
    return windows * st, start


def _overlap(a: Interval, b: Interval) -> Interval:
    return max(a[0], b[0]), min(a[1], b[1])
