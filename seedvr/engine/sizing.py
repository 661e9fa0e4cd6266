"""The size of a restored item, decided once per item from the request's size wishes and the input size.

    wishes = SizeWishes(res_h=1280, res_w=720)                   # or SizeWishes(scale=2.0)
    size = item_size(wishes, height=360, width=640, max_area=3840 * 2160)
    size.res_h, size.res_w    # the area the official resize aims at (what the pipeline takes)
    size.height, size.width   # the restored frames' size (multiples of 16)

res_h x res_w (or the input area times scale²) sets the output AREA; the aspect ratio follows the input, as
the official script does. `max_resolution` (width, height) and the worker's SEEDVR_MAX_OUTPUT_AREA cap that
area: a larger target is scaled down to fit.
"""

import math
from dataclasses import dataclass

from seedvr.engine.preprocess import output_size
from seedvr.errors import INVALID_INPUT, RestoreError

MIN_OUTPUT_SIDE = 16  # pixels


@dataclass(frozen=True)
class SizeWishes:
    """What a request asks of the output size: an area (res_h x res_w) or a scale, and a cap."""

    res_h: int = 1280
    res_w: int = 720
    scale: float | None = None  # instead of res_h/res_w: the input area times scale²
    max_resolution: tuple[int, int] = (3840, 2160)  # (width, height): caps the area


@dataclass(frozen=True)
class ItemSize:
    res_h: int  # the area target handed to the pipeline
    res_w: int
    height: int  # the restored frames
    width: int

    def describe(self) -> str:
        return f"{self.width}x{self.height}"


def item_size(wishes: SizeWishes, height: int, width: int, max_area: int) -> ItemSize:
    """The output size of an input of height x width; INVALID_INPUT when a side would be under 16 pixels."""
    if wishes.scale is not None:
        res_h, res_w = round(height * wishes.scale), round(width * wishes.scale)
    else:
        res_h, res_w = wishes.res_h, wishes.res_w
    cap_width, cap_height = wishes.max_resolution
    cap = min(cap_width * cap_height, max_area)
    if res_h * res_w > cap:
        shrink = math.sqrt(cap / (res_h * res_w))
        res_h, res_w = math.floor(res_h * shrink), math.floor(res_w * shrink)
    res_h, res_w = max(res_h, 1), max(res_w, 1)
    out_h, out_w = output_size(height, width, res_h, res_w)
    if out_h < MIN_OUTPUT_SIDE or out_w < MIN_OUTPUT_SIDE:
        raise RestoreError(INVALID_INPUT, f"the requested size gives a {out_w}x{out_h} output for this {width}x"
                                          f"{height} input; each side must be at least {MIN_OUTPUT_SIDE} pixels: "
                                          "raise res_h/res_w or scale")
    return ItemSize(res_h, res_w, out_h, out_w)
