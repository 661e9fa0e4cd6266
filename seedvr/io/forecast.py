"""What a job's results will at least weigh, and what they lose, known before the work.

    least = least_video_bytes(encoding, width, height, frames)   # a low estimate of the encoded file
    least = least_image_bytes(encoding, width, height)

An encoded size cannot be known before encoding, so these are floors, not guesses: bits per pixel
well under what restored frames cost. Restored frames are photographic (the model draws fine
texture): PNG takes them at about 10-18 bits a pixel, JPEG at quality 95 (4:4:4, as written here) at
about 4-6, H.264 at crf 18 at about 0.05-0.3 bits a pixel a frame (still shots the least). The
floors are a half to a tenth of that; only flat graphics go lower. A floor over a limit therefore means the
result surely exceeds it; a floor under it says nothing.
"""

import re

from seedvr.io.media.encoders import resolve_crf
from seedvr.io.outputs import ImageEncoding, VideoEncoding

BITS_PER_BYTE = 8
PNG_BITS_PER_PIXEL = 6.0  # a quarter of raw RGB
LOSSLESS_WEBP_BITS_PER_PIXEL = 4.0  # webp at quality 100 is lossless (seedvr.io.media.image)
# (quality, bits per pixel) points, interpolated linearly in between
JPEG_BITS_PER_PIXEL = ((1, 0.03), (50, 0.2), (75, 0.35), (90, 0.7), (95, 1.2), (100, 2.5))
LOSSY_WEBP_BITS_PER_PIXEL = ((1, 0.01), (50, 0.06), (75, 0.1), (90, 0.2), (99, 0.5))  # lossy WebP smooths fine texture


# codec -> (crf, bits per pixel per frame at that crf, crf steps that halve the size)
CRF_BITS_PER_PIXEL = {
    "h264": (18, 0.01, 5),
    "h265": (20, 0.005, 5),
    "vp9": (30, 0.005, 5),
    "av1": (30, 0.004, 5),
}
# codecs without a crf: bits per pixel per frame
FIXED_BITS_PER_PIXEL = {
    "prores": 1.0,  # intra-only at the profile's data rate: 422 HQ aims at about 3.5 bits a pixel
    "ffv1": 3.0,  # lossless: a quarter of raw 4:2:0 (12 bits a pixel)
}
# ffmpeg pixel formats with an alpha plane: yuva420p, gbrap, ya8, rgba, bgra, argb, abgr, rgba64le, ...
ALPHA_PIX_FMT = re.compile(r"^(yuva|gbrap|ya\d|rgba|bgra|argb|abgr)")


def least_image_bytes(encoding: ImageEncoding, width: int, height: int) -> int:
    """A floor of the size of a restored (width, height) image written as `encoding` asks."""
    match encoding.format.lower():
        case "png":
            bits = PNG_BITS_PER_PIXEL
        case "webp" if encoding.quality == 100:
            bits = LOSSLESS_WEBP_BITS_PER_PIXEL
        case "webp":
            bits = _interpolate(LOSSY_WEBP_BITS_PER_PIXEL, encoding.quality)
        case "jpeg" | "jpg":
            bits = _interpolate(JPEG_BITS_PER_PIXEL, encoding.quality)
        case other:
            raise ValueError(f"no size floor for image format {other!r}")
    return int(width * height * bits / BITS_PER_BYTE)


def least_comparison_bytes(width: int, height: int) -> int:
    """A floor of the before/after PNG of a (width, height) result: two halves side by side."""
    return int(2 * width * height * PNG_BITS_PER_PIXEL / BITS_PER_BYTE)


def least_video_bytes(encoding: VideoEncoding, width: int, height: int, frames: int) -> int:
    """A floor of the size of a restored video of `frames` (width, height) frames in `encoding` (audio not
    counted: it only adds)."""
    crf = resolve_crf(encoding.codec, encoding.crf)
    if crf is None:
        bits = FIXED_BITS_PER_PIXEL[encoding.codec]
    else:
        reference_crf, reference_bits, halving = CRF_BITS_PER_PIXEL[encoding.codec]
        bits = reference_bits * 2.0 ** ((reference_crf - crf) / halving)
    return int(width * height * frames * bits / BITS_PER_BYTE)


def video_has_alpha(pix_fmt: str | None) -> bool:
    """Whether a probed pixel format carries transparency (which the restored video, always opaque, drops).
    VP9's alpha lives in side data that the probe does not see: such a file reads as opaque here."""
    return bool(pix_fmt and ALPHA_PIX_FMT.match(pix_fmt))


def _interpolate(points: tuple[tuple[int, float], ...], quality: int) -> float:
    """The bits per pixel at `quality` on the line through the table's points (held flat past its ends)."""
    if quality <= points[0][0]:
        return points[0][1]
    for (low_q, low_bits), (high_q, high_bits) in zip(points, points[1:]):
        if quality <= high_q:
            return low_bits + (high_bits - low_bits) * (quality - low_q) / (high_q - low_q)
    return points[-1][1]
