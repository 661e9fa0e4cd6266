"""A before/after picture: the input, resized to the output's size, beside the restored frame.

    picture = side_by_side(input_frame, restored_frame)  # uint8 (H, 2W + gap, 3)

The input is resized with Pillow's Lanczos filter to exactly the output's size
(stretched if the aspect ratios differ by the model's size rounding), so both halves
show the same content at the same scale. A thin light separator lies between them,
and each half can carry a small "before"/"after" label in its top-left corner.
Frames with transparency (RGBA) are shown over a grey checkerboard, as image editors
show it, so a transparent pixel shows as transparent and not as whatever colour it
happens to store; an RGBA input is resized with premultiplied alpha (Pillow does so
for RGBA), so those colours do not bleed into their visible neighbours either.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SEPARATOR_COLOUR = (235, 235, 235)
LABEL_TEXT_COLOUR = (255, 255, 255)
LABEL_BOX_COLOUR = (0, 0, 0, 160)  # translucent, so the picture shows through a little
LABEL_HEIGHT_FRACTION = 1 / 28  # label text height relative to the picture's height
MIN_LABEL_SIZE = 10  # pixels
LABELS = ("before", "after")
CHECKER_COLOURS = ((204, 204, 204), (153, 153, 153))  # the light and dark squares behind transparent pixels
CHECKER_FRACTION = 1 / 48  # square side relative to the picture's height
MIN_CHECKER_SQUARE = 4  # pixels


def side_by_side(before: np.ndarray, after: np.ndarray, gap: int | None = None, labels: bool = True) -> np.ndarray:
    """uint8 (H, 2W + gap, 3): `before` (h, w, c) resized to `after`'s (H, W) on the
    left, `after` on the right; c is 3 (RGB) or 4 (RGBA, shown over a checkerboard).
    `gap` is the separator width; None picks about 0.4 % of the width, at least 2 pixels."""
    for name, frame in (("before", before), ("after", after)):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4) or 0 in frame.shape:
            raise ValueError(f"{name} must be a non-empty uint8 (h, w, 3) or (h, w, 4) array, "
                             f"got {frame.dtype} {frame.shape}")
    height, width = after.shape[:2]
    gap = max(2, round(width / 250)) if gap is None else gap
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    resized = Image.fromarray(np.ascontiguousarray(before)).resize((width, height), Image.Resampling.LANCZOS)
    square = max(MIN_CHECKER_SQUARE, round(height * CHECKER_FRACTION))
    canvas = Image.new("RGB", (2 * width + gap, height), SEPARATOR_COLOUR)
    canvas.paste(_on_checkerboard(resized, square), (0, 0))
    canvas.paste(_on_checkerboard(Image.fromarray(np.ascontiguousarray(after)), square), (width + gap, 0))
    if labels:
        _draw_labels(canvas, (0, width + gap), width, height)
    return np.asarray(canvas).copy()


def checkerboard(width: int, height: int, square: int) -> Image.Image:
    """An RGBA (width, height) board of `square`-pixel squares, the light colour at the top-left corner."""
    rows = np.arange(height, dtype=np.int32)[:, None] // square
    columns = np.arange(width, dtype=np.int32)[None, :] // square
    dark = (rows + columns) % 2  # (H, W): 0 light, 1 dark
    pixels = np.asarray(CHECKER_COLOURS, dtype=np.uint8)[dark]  # (H, W, 3)
    return Image.fromarray(np.dstack([pixels, np.full((height, width), 255, np.uint8)]), "RGBA")


def _on_checkerboard(picture: Image.Image, square: int) -> Image.Image:
    """An RGBA picture composited over a checkerboard, as RGB; an RGB one as it is."""
    if picture.mode != "RGBA":
        return picture
    return Image.alpha_composite(checkerboard(picture.width, picture.height, square), picture).convert("RGB")


def _draw_labels(canvas: Image.Image, lefts: tuple[int, int], width: int, height: int) -> None:
    """"before" / "after" in a dark box at the top-left corner of each half; none
    on halves too small to hold them."""
    size = max(MIN_LABEL_SIZE, round(height * LABEL_HEIGHT_FRACTION))
    font = _label_font(size)
    margin = max(2, size // 3)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for left, text in zip(lefts, LABELS):
        x, y = left + margin, margin
        box_left, box_top, box_right, box_bottom = draw.textbbox((x, y), text, font=font)
        if box_right + margin > left + width or box_bottom + margin > height:
            return
        draw.rectangle((box_left - margin, box_top - margin, box_right + margin, box_bottom + margin),
                       fill=LABEL_BOX_COLOUR)
        draw.text((x, y), text, font=font, fill=LABEL_TEXT_COLOUR)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB"))


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels; its fixed-size bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size)
    except ImportError:  # Pillow built without FreeType: the bitmap font has a single size
        return ImageFont.load_default()
