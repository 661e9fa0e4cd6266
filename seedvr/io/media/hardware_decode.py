"""NVDEC: decode H.264, HEVC, VP9 and AV1 inputs on the GPU when this machine can.

Whether it can is asked once per codec and process: a two-frame clip of that codec (made with ffmpeg's
CPU encoder) must decode with `-hwaccel cuda` into CUDA frames (`-hwaccel_output_format cuda`, downloaded
after), which fails without an NVIDIA GPU, a driver, or an ffmpeg built with CUDA. When it works, real
decodes add `-hwaccel cuda` alone: ffmpeg then decodes on the GPU and falls back to its CPU decoder by itself
for a stream NVDEC does not take (4:2:2 H.264, for instance), so a decode never fails for choosing the GPU.
"""

import functools
import logging
import subprocess

from seedvr.io.media.ffmpeg import ffmpeg_exe

logger = logging.getLogger(__name__)

TRIAL_ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
TRIAL_SIZE = 256  # above NVDEC's minimum frame size for every codec
TRIAL_TIMEOUT_S = 60


def decoder_options(codec: str) -> list[str]:
    """The input options that decode `codec` (ffmpeg's name of the stored video) on the GPU; [] for the CPU."""
    return ["-hwaccel", "cuda"] if nvdec_works(codec) else []


def decoder_name(codec: str) -> str:
    """What decodes `codec` here, for processing_info: "nvdec" or "cpu"."""
    return "nvdec" if nvdec_works(codec) else "cpu"


@functools.cache
def nvdec_works(codec: str) -> bool:
    """Whether a short clip of `codec` decodes into CUDA frames here (silently False when it cannot)."""
    encoder = TRIAL_ENCODERS.get(codec)
    if encoder is None:
        return False
    sample = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-f", "lavfi",
         "-i", f"testsrc2=size={TRIAL_SIZE}x{TRIAL_SIZE}:rate=25", "-frames:v", "2", "-c:v", encoder,
         "-pix_fmt", "yuv420p", "-f", "matroska", "pipe:1"],
        capture_output=True, timeout=TRIAL_TIMEOUT_S, check=False)
    if sample.returncode != 0:
        return False
    try:
        decoded = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-hwaccel", "cuda",
             "-hwaccel_output_format", "cuda", "-i", "pipe:0", "-vf", "hwdownload,format=nv12", "-f", "null", "-"],
            input=sample.stdout, capture_output=True, timeout=TRIAL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return False
    works = decoded.returncode == 0
    if works:
        logger.info("NVDEC decodes %s here: %s inputs are decoded on the GPU", codec, codec)
    return works
