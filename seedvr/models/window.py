"""Window partitions of the patch grid, and the packing they induce for varlen attention.

Every DiT block attends inside 3-D windows of one sample's video tokens, each window joined by all of
that sample's text tokens. Window sizes come from a "720p" reference grid of 45x80 tokens, so a larger
video gets more windows, not larger ones. Even layers use the regular tiling "720pwin_by_size_bysize",
odd layers the half-window shifted tiling "720pswin_by_size_bysize" (SEEDVR2_SPEC 2.8.1).

Windows are enumerated w-axis outermost, then h, then t innermost; tokens inside a window keep the
(t, h, w) row-major order of the grid. `WindowPacking` turns a batch's windows into the index tensors
attention needs; it is built once per forward for each window kind and shared by all its blocks.
"""

import math
from dataclasses import dataclass

import torch

REFERENCE_AREA = 45 * 80  # tokens of a 720x1280 frame after 8x VAE and 2x2 patch
MAX_TEMPORAL_WINDOW = 30  # frames; longer clips still get num_windows[0] windows of at most 30/4 frames

Grid = tuple[int, int, int]
Interval = tuple[int, int]
WindowSlices = tuple[slice, slice, slice]


def window_size(grid: Grid, num_windows: tuple[int, int, int]) -> Grid:
    """Window extent (wt, wh, ww) on a patch grid (t, h, w); float steps as the official code."""
    t, h, w = grid
    nt, nh, nw = num_windows
    scale = math.sqrt(REFERENCE_AREA / (h * w))
    resized_h, resized_w = round(h * scale), round(w * scale)  # Python round: ties to even
    return math.ceil(min(t, MAX_TEMPORAL_WINDOW) / nt), math.ceil(resized_h / nh), math.ceil(resized_w / nw)


def regular_intervals(length: int, size: int) -> list[Interval]:
    """Tiles of `size` from 0; the last one may be shorter."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def shifted_intervals(length: int, size: int) -> list[Interval]:
    """Tiles of `size` starting half a tile early (when the tile is shorter than the axis), empties dropped."""
    if size >= length:
        return [(0, length)]
    shift = 0.5
    count = math.ceil((length - shift) / size) + 1
    cuts = [(max(int((i - shift) * size), 0), min(int((i - shift + 1) * size), length)) for i in range(count)]
    return [(start, stop) for start, stop in cuts if stop > start]


AXIS_INTERVALS = {
    "720pwin_by_size_bysize": regular_intervals,
    "720pswin_by_size_bysize": shifted_intervals,
}
WINDOW_METHODS = tuple(AXIS_INTERVALS)


def check_window_method(method: str) -> str:
    if method not in AXIS_INTERVALS:
        raise ValueError(f"unknown window_method {method!r}; expected one of {', '.join(WINDOW_METHODS)}")
    return method


def axis_intervals(method: str, grid: Grid, num_windows: tuple[int, int, int]) -> list[list[Interval]]:
    """Per axis (t, h, w), the list of [start, stop) cuts of one sample's grid."""
    split = AXIS_INTERVALS[check_window_method(method)]
    return [split(length, size) for length, size in zip(grid, window_size(grid, num_windows))]


def _boxes(cuts: list[list[Interval]]) -> list[WindowSlices]:
    """Per-axis cuts -> windows, in the official enumeration order (w outermost, t innermost)."""
    cuts_t, cuts_h, cuts_w = cuts
    return [(slice(*ct), slice(*ch), slice(*cw)) for cw in cuts_w for ch in cuts_h for ct in cuts_t]


def window_slices(method: str, grid: Grid, num_windows: tuple[int, int, int]) -> list[WindowSlices]:
    """The windows of one sample as (t, h, w) slices of its patch grid."""
    return _boxes(axis_intervals(method, grid, num_windows))


def _axis_lookup(cuts: list[Interval], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every coordinate of an axis: its window index, its window-local coordinate, its window's extent."""
    starts = torch.tensor([start for start, _ in cuts])
    sizes = torch.tensor([stop - start for start, stop in cuts])
    index = torch.repeat_interleave(torch.arange(len(cuts)), sizes)  # the cuts tile [0, length)
    assert index.numel() == length
    return index, torch.arange(length) - starts[index], sizes[index]


def _grid_lookup(cuts: list[list[Interval]], grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token of a grid (t, h, w row-major): window id in the official enumeration order
    [T*H*W], window-local coordinates [T*H*W, 3] and window extent [T*H*W, 3]."""
    (it, lt, et), (ih, lh, eh), (iw, lw, ew) = (_axis_lookup(c, n) for c, n in zip(cuts, grid))
    n_t, n_h = len(cuts[0]), len(cuts[1])

    def per_token(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.stack(torch.broadcast_tensors(t[:, None, None], h[None, :, None], w[None, None, :]), -1)

    window_id = (iw[None, None, :] * n_h + ih[None, :, None]) * n_t + it[:, None, None]
    return window_id.flatten(), per_token(lt, lh, lw).reshape(-1, 3), per_token(et, eh, ew).reshape(-1, 3)


@dataclass
class WindowPacking:
    """How one batch's video and text tokens are packed into per-window attention sequences.

    Attention input rows are `torch.cat([vid (L rows), txt (l rows)])[pack_index]`; sequence i of the
    packed batch is `[video tokens of window i, all text tokens of its sample]`.
    """

    windows: list[list[WindowSlices]]  # per sample, its windows
    pack_index: torch.Tensor  # [N] int64, rows of cat([vid, txt]) in packed order
    vid_rows: torch.Tensor  # [L] int64, packed row of every video token (original order)
    txt_rows: torch.Tensor  # [sum_b l_b * n_b] int64, packed rows of the text copies, token-major per sample
    txt_copies: list[int]  # per sample, windows n_b = copies of each of its text tokens
    txt_lengths: list[int]  # per sample, l_b
    cu_seqlens: torch.Tensor  # [n_windows + 1] int32, prefix sums of the sequence lengths
    seqlens: list[int]  # the sequence lengths, on the host (no device sync to read them)
    max_seqlen: int
    local_coords: torch.Tensor  # [L, 3] int64, window-local (t, h, w) of every video token
    window_extent: torch.Tensor  # [L, 3] int64, (t, h, w) extent of every video token's window

    def pack(self, vid: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """[L, ...] video and [l, ...] text rows -> [N, ...] packed rows."""
        return torch.cat([vid, txt]).index_select(0, self.pack_index)

    def unpack(self, packed: torch.Tensor, need_txt: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, ...] packed rows -> video rows [L, ...] and text rows [l, ...], text averaged over windows."""
        vid = packed.index_select(0, self.vid_rows)
        if not need_txt:
            return vid, None
        copies = packed.index_select(0, self.txt_rows)
        sizes = [length * count for length, count in zip(self.txt_lengths, self.txt_copies)]
        txt = [part.unflatten(0, (length, count)).float().mean(1)
               for part, length, count in zip(copies.split(sizes), self.txt_lengths, self.txt_copies)]
        return vid, torch.cat(txt).to(packed.dtype)


def pack_windows(method: str, num_windows: tuple[int, int, int], grids: list[Grid], txt_lengths: list[int],
                 device: torch.device | str = "cpu") -> WindowPacking:
    """Windows of every sample (patch grids `grids`, text lengths `txt_lengths`) and their packing."""
    if len(grids) != len(txt_lengths):
        raise ValueError(f"{len(grids)} video grids but {len(txt_lengths)} text lengths")
    num_vid = sum(math.prod(grid) for grid in grids)
    pack_index: list[torch.Tensor] = []
    vid_rows: list[torch.Tensor] = []
    txt_rows: list[torch.Tensor] = []
    seqlens: list[torch.Tensor] = []
    local: list[torch.Tensor] = []
    extent: list[torch.Tensor] = []
    windows: list[list[WindowSlices]] = []
    vid_offset = txt_offset = packed_offset = 0
    for grid, txt_length in zip(grids, txt_lengths):
        cuts = axis_intervals(method, grid, num_windows)
        windows.append(_boxes(cuts))
        window_id, coords, sizes = _grid_lookup(cuts, grid)
        local.append(coords)
        extent.append(sizes)

        # Sequence k = [tokens of window k, text], starting at packed row seq_start[k].
        window_len = torch.bincount(window_id, minlength=len(windows[-1]))
        seq_len = window_len + txt_length
        seq_start = packed_offset + torch.cumsum(seq_len, 0) - seq_len
        # A video token's row: its sequence start + its rank among its window's tokens (grid order kept).
        order = torch.argsort(window_id, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        rows = seq_start[window_id] + rank - (torch.cumsum(window_len, 0) - window_len)[window_id]
        txt_pos = seq_start[:, None] + window_len[:, None] + torch.arange(txt_length)  # [n_windows, l]

        sources = torch.empty(int(seq_len.sum()), dtype=torch.long)
        sources[rows - packed_offset] = vid_offset + torch.arange(rows.numel())
        sources[txt_pos.flatten() - packed_offset] = (num_vid + txt_offset + torch.arange(txt_length)).repeat(
            len(windows[-1]))
        pack_index.append(sources)
        vid_rows.append(rows)
        txt_rows.append(txt_pos.t().flatten())  # token-major: the copies of one text token are adjacent
        seqlens.append(seq_len)
        vid_offset += rows.numel()
        txt_offset += txt_length
        packed_offset += int(seq_len.sum())

    all_seqlens = torch.cat(seqlens)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(all_seqlens, 0), (1, 0)).to(torch.int32)
    return WindowPacking(
        windows=windows,
        pack_index=torch.cat(pack_index).to(device),
        vid_rows=torch.cat(vid_rows).to(device),
        txt_rows=torch.cat(txt_rows).to(device),
        txt_copies=[len(sample) for sample in windows],
        txt_lengths=list(txt_lengths),
        cu_seqlens=cu_seqlens.to(device),
        seqlens=all_seqlens.tolist(),
        max_seqlen=int(all_seqlens.max()),
        local_coords=torch.cat(local).to(device),
        window_extent=torch.cat(extent).to(device),
    )
