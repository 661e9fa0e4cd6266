"""Still images in and out through Pillow.

Whatever the stored mode, an image is read as 8-bit RGB plus, when it has any
transparency, a separate 8-bit alpha plane: the model only restores RGB, and the
alpha plane is resized to the output size and put back when writing a format
that can hold it. EXIF orientation is applied on reading, so the arrays are
upright and the written file needs no orientation tag.

Colour management is not done: ICC profiles are ignored and CMYK is converted
with Pillow's plain formula. Only the first frame of a multi-page TIFF is read.
"""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from seedvr.errors import INVALID_INPUT, UNSUPPORTED_MEDIA, RestoreError

MAX_IMAGE_PIXELS = 8192 * 8192  # also below Pillow's own bomb threshold (89.5 MP), which then never fires
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grey ("I": how older files open)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
KEEPS_ALPHA = {"PNG", "WEBP"}


@dataclass(frozen=True)
class ImageFormat:
    pillow: str  # Pillow's format name
    mime: str
    extension: str  # without the dot


OUTPUT_FORMATS = {
    "png": ImageFormat("PNG", "image/png", "png"),
    "jpeg": ImageFormat("JPEG", "image/jpeg", "jpg"),
    "jpg": ImageFormat("JPEG", "image/jpeg", "jpg"),
    "webp": ImageFormat("WEBP", "image/webp", "webp"),
}
QUALITY_RANGE = (1, 100)
LOSSLESS_WEBP_QUALITY = 100  # webp at this quality is written lossless


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # uint8 (h, w, 3)
    alpha: np.ndarray | None  # uint8 (h, w), None when the image has no transparency

    @property
    def height(self) -> int:
        return self.rgb.shape[0]

    @property
    def width(self) -> int:
        return self.rgb.shape[1]


def read_image(path_or_bytes: bytes | bytearray | str | Path, field: str = "image",
               max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode an image file (path or bytes) to upright 8-bit RGB and optional alpha."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes)
    try:
        with warnings.catch_warnings():
            # Sizes are checked below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_size(image.width, image.height, field, max_pixels)
                image.load()
                upright = ImageOps.exif_transpose(image)
        return _to_rgb_and_alpha(upright, field)
    except RestoreError:
        raise
    except Image.DecompressionBombError as err:
        raise RestoreError(
            INVALID_INPUT,
            f"{field} is too large to decode safely (over {max_pixels / 1e6:.0f} megapixels); "
            "send a smaller image",
        ) from err
    except MemoryError:
        raise
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, struct.error...
        raise RestoreError(
            INVALID_INPUT,
            f"{field} cannot be decoded as an image ({type(err).__name__}); "
            "the file may be damaged or truncated",
        ) from err


def write_image(rgb: np.ndarray, alpha: np.ndarray | None, path: str | Path, format: str = "png",
                quality: int = 95) -> None:
    """Write RGB (h, w, 3) uint8 and, for png/webp, the alpha plane resized to (h, w).

    jpeg drops alpha. `quality` (1-100) applies to jpeg (chroma kept at full
    resolution) and webp: webp is lossy below 100 and lossless at 100, where a
    lossy WebP would still lose detail. png is always lossless.
    """
    spec = _output_format(format)
    low, high = QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, int) or not low <= quality <= high:
        raise ValueError(f"quality must be an integer between {low} and {high}, got {quality!r}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(rgb, "RGB")
    if alpha is not None and spec.pillow in KEEPS_ALPHA:
        image.putalpha(Image.fromarray(resized_alpha(alpha, image.width, image.height), "L"))
    if spec.pillow == "JPEG":
        options = {"quality": quality, "subsampling": 0}
    elif spec.pillow == "WEBP" and quality == LOSSLESS_WEBP_QUALITY:
        options = {"lossless": True, "exact": True}  # exact: keep the colour under transparent pixels
    elif spec.pillow == "WEBP":
        options = {"quality": quality}
    else:
        options = {}
    image.save(path, format=spec.pillow, **options)


def resized_alpha(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (h, w) alpha plane -> (height, width), Lanczos: the plane a restored image is written with."""
    plane = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8), "L")
    if plane.size != (width, height):
        plane = plane.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(plane)


def keeps_alpha(format: str) -> bool:
    """Whether an output format carries transparency (png, webp; jpeg does not)."""
    return _output_format(format).pillow in KEEPS_ALPHA


def image_mime(format: str) -> str:
    return _output_format(format).mime


def image_extension(format: str) -> str:
    return _output_format(format).extension


def _output_format(format: str) -> ImageFormat:
    if not isinstance(format, str) or format.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {sorted(OUTPUT_FORMATS)}, got {format!r}")
    return OUTPUT_FORMATS[format.lower()]


def _check_size(width: int, height: int, field: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise RestoreError(INVALID_INPUT, f"{field} has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise RestoreError(
            INVALID_INPUT,
            f"{field} is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the limit "
            f"of {max_pixels / 1e6:.0f}; send a smaller image",
        )


def _to_rgb_and_alpha(image: Image.Image, field: str) -> DecodedImage:
    """Any Pillow mode -> uint8 RGB + optional uint8 alpha."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling.
        grey = np.asarray(image, dtype=np.float64)
        grey8 = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return DecodedImage(np.repeat(grey8[:, :, None], 3, axis=2), None)
    if image.mode == "F":
        raise RestoreError(
            UNSUPPORTED_MEDIA, f"{field} is a floating-point image; send an 8- or 16-bit image"
        )
    has_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return DecodedImage(np.asarray(image.convert("RGB")).copy(), None)
    rgba = np.asarray(image.convert("RGBA"))
    return DecodedImage(np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3]))
