"""Opt-in spatial tiling of the VAE, for frames too large even with exact slicing and conv splitting.

Each frame is encoded (decoded) in square tiles that overlap their neighbours by `overlap` pixels; the
tiles' outputs are blended with complementary linear ramps across each overlap and normalised by the
summed weights. This is NOT exact (SEEDVR2_SPEC 3.6): a tile's per-frame GroupNorm statistics and the
mid-block attention see only the tile, and the zero padding at a tile's edge is not the neighbouring
content. On smooth content the difference is small; on detailed content seams can show. Off by default;
the memory plan or the request (`vae_tiling`, `vae_tile_size`) turns it on.

Tiles are laid out on the latent grid (pixels / spatial factor), the last one flush with the far edge,
so every tile has the full size unless the frame is smaller than one tile.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpatialTiling:
    tile: int  # tile side in pixels; a multiple of the VAE's spatial factor
    overlap: int  # pixels shared by neighbouring tiles; a multiple of the spatial factor, < tile

    def encode(self, encode: Callable[[Tensor], Tensor], video: Tensor, factor: int) -> Tensor:
        """encode(video (B, C, T, H, W)) -> (B, C', T', H/f, W/f), applied tile by tile."""
        self._check(factor)
        grid = (video.shape[-2] // factor, video.shape[-1] // factor)
        return _tiled(encode, video, grid, self.tile // factor, self.overlap // factor, factor, 1)

    def decode(self, decode: Callable[[Tensor], Tensor], latent: Tensor, factor: int) -> Tensor:
        """decode(latent (B, C, T', h, w)) -> (B, C', T, h·f, w·f), applied tile by tile."""
        self._check(factor)
        grid = (latent.shape[-2], latent.shape[-1])
        return _tiled(decode, latent, grid, self.tile // factor, self.overlap // factor, 1, factor)

    def _check(self, factor: int) -> None:
        if self.tile % factor or self.overlap % factor or not 0 <= self.overlap < self.tile:
            raise ValueError(f"VAE tiles need tile and overlap multiples of {factor} with overlap < tile, "
                             f"got tile {self.tile}, overlap {self.overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` cells covering [0, length), `tile - overlap` apart, the last one flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _axis_weights(starts: list[int], tile: int, scale: int) -> list[Tensor]:
    """Per tile, float32 weights over its tile·scale output cells: a ramp up across the cells it shares
    with the previous tile, down across those shared with the next; complementary in each overlap."""
    weights = []
    for index, start in enumerate(starts):
        weight = torch.ones(tile * scale)
        if index > 0:
            shared = (starts[index - 1] + tile - start) * scale
            weight[:shared] *= (torch.arange(shared) + 0.5) / shared
        if index + 1 < len(starts):
            shared = (start + tile - starts[index + 1]) * scale
            weight[tile * scale - shared:] *= 1 - (torch.arange(shared) + 0.5) / shared
        weights.append(weight)
    return weights


def _tiled(run: Callable[[Tensor], Tensor], x: Tensor, grid: tuple[int, int], tile: int, overlap: int,
           in_scale: int, out_scale: int) -> Tensor:
    """Apply `run` to tiles of x's last two axes; `grid` cells, each in_scale (x) / out_scale (output) wide."""
    rows, cols = (tile_starts(length, tile, overlap) for length in grid)
    if len(rows) == len(cols) == 1:
        return run(x)
    tile_h, tile_w = min(tile, grid[0]), min(tile, grid[1])
    row_weights, col_weights = _axis_weights(rows, tile_h, out_scale), _axis_weights(cols, tile_w, out_scale)
    summed: Tensor | None = None
    total: Tensor | None = None
    dtype: torch.dtype | None = None
    for row, row_weight in zip(rows, row_weights):
        for col, col_weight in zip(cols, col_weights):
            piece = x[..., row * in_scale:(row + tile_h) * in_scale, col * in_scale:(col + tile_w) * in_scale]
            output = run(piece)
            if summed is None or total is None:  # both are set together, on the first tile
                size = (grid[0] * out_scale, grid[1] * out_scale)
                summed = output.new_zeros((*output.shape[:-2], *size), dtype=torch.float32)
                total = output.new_zeros(size, dtype=torch.float32)
                dtype = output.dtype
            weight = (row_weight[:, None] * col_weight[None, :]).to(total.device)
            out_rows = slice(row * out_scale, (row + tile_h) * out_scale)
            out_cols = slice(col * out_scale, (col + tile_w) * out_scale)
            summed[..., out_rows, out_cols] += output.float() * weight
            total[out_rows, out_cols] += weight
            del output, piece
    assert summed is not None and total is not None and dtype is not None  # rows and cols are never empty
    return summed.div_(total).to(dtype)
