"""Lossless intermediate video: restored uint8 RGB frames kept bit for bit on their way to another worker.

FFV1 (level 3, every frame a key frame) in Matroska with an RGB pixel format (gbrp) stores the frames exactly:
the reader's rgb24 output interleaves the same planes back (checked in tests/test_fanout_parts.py). A YUV
intermediate would not be exact, even "lossless" x264 -qp 0 in yuv420p: the RGB -> YUV matrix rounds and the
chroma is subsampled. The files carry no timing the merge needs (the final encode takes the source's), no audio and
no colour tags beyond ffmpeg's own RGB marking.

    with LosslessWriter(path, width, height) as writer:
        for frame in frames:          # uint8 (height, width, 3)
            writer.write(frame)
    for frame in read_lossless(path, width, height, count): ...
"""

import logging
from collections.abc import Generator
from pathlib import Path

import numpy as np

from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.media.ffmpeg import ffmpeg_exe
from seedvr.io.media.frame_pipe import FramePipeWriter
from seedvr.io.media.video import iter_frames, probe_video

log = logging.getLogger(__name__)

EXTENSION = ".mkv"
MIME = "video/x-matroska"
PIXEL_FORMAT = "gbrp"  # planar 8-bit RGB: FFV1 stores it losslessly, no YUV conversion anywhere
NOMINAL_RATE = "25"  # the frames' timing is not used: the merge re-times them at the source's rate


class LosslessWriter(FramePipeWriter):
    """Encode uint8 RGB frames of one size into an FFV1 RGB Matroska file (the life cycle, checks and errors are
    seedvr.io.media.frame_pipe's)."""

    failure = "writing a lossless intermediate failed"
    doing = "writing a segment's lossless intermediate"

    def __init__(self, path: Path, width: int, height: int) -> None:
        super().__init__(Path(path), width, height)
        self._start([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                     "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", self.piped_size, "-framerate", NOMINAL_RATE,
                     "-i", "pipe:0", "-c:v", "ffv1", "-level", "3", "-g", "1", "-pix_fmt", PIXEL_FORMAT,
                     "-map_metadata", "-1", "-f", "matroska", str(self.path)])


def read_lossless(path: Path, width: int, height: int, count: int,
                  what: str = "the intermediate") -> Generator[np.ndarray, None, None]:
    """The frames of a LosslessWriter file, checked to be `count` frames of width x height; INTERNAL otherwise."""
    info = probe_video(path, field=what)  # deinterlace "off": the frames as stored
    if (info.width, info.height, info.frame_count) != (width, height, count):
        raise RestoreError(INTERNAL, f"{what} holds {info.frame_count} frames of {info.width}x{info.height}, "
                                     f"expected {count} of {width}x{height}")
    yield from iter_frames(path, info, field=what)
