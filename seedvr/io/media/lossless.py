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
import subprocess
import tempfile
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import numpy as np

from seedvr.errors import INTERNAL, RestoreError, no_space
from seedvr.io.media.ffmpeg import FfmpegError, ffmpeg_exe, packet_timing, tail
from seedvr.io.media.video import iter_frames, probe_video, stop_process

log = logging.getLogger(__name__)

EXTENSION = ".mkv"
MIME = "video/x-matroska"
PIXEL_FORMAT = "gbrp"  # planar 8-bit RGB: FFV1 stores it losslessly, no YUV conversion anywhere
NOMINAL_RATE = "25"  # the frames' timing is not used: the merge re-times them at the source's rate
FINISH_TIMEOUT_S = 600
NO_SPACE_MESSAGE = "No space left on device"


class LosslessWriter:
    """Encode uint8 RGB frames of one size into an FFV1 RGB Matroska file; leaving the block checks that the file
    holds exactly the frames written, and removes it on any error."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path, self.width, self.height = Path(path), width, height
        self.frames_written = 0
        self._stderr = tempfile.TemporaryFile()
        command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", NOMINAL_RATE,
                   "-i", "pipe:0", "-c:v", "ffv1", "-level", "3", "-g", "1", "-pix_fmt", PIXEL_FORMAT,
                   "-map_metadata", "-1", "-f", "matroska", str(self.path)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr)

    def __enter__(self) -> "LosslessWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()
            self.path.unlink(missing_ok=True)

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame must be uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {frame.shape}")
        assert self._process.stdin is not None  # stdin=PIPE
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError) as error:
            self._fail(f"ffmpeg stopped accepting frames after {self.frames_written}", error)
        self.frames_written += 1

    def close(self) -> None:
        assert self._process.stdin is not None  # stdin=PIPE
        if self._process.stdin.closed:
            return
        try:
            self._process.stdin.close()
            returncode = self._process.wait(timeout=FINISH_TIMEOUT_S)
        except (BrokenPipeError, subprocess.TimeoutExpired) as error:
            self._fail("ffmpeg did not finish the intermediate", error)
        if returncode != 0:
            self._fail(f"ffmpeg exited with {returncode}")
        try:
            written = packet_timing(self.path, 0).count
        except FfmpegError as error:
            self._fail(str(error), error)
        self._abort()
        if written != self.frames_written:
            self.path.unlink(missing_ok=True)
            raise RestoreError(INTERNAL, f"the lossless intermediate holds {written} frames, {self.frames_written} "
                                         "were written")

    def _abort(self) -> None:
        stop_process(self._process)
        self._stderr.close()

    def _fail(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        stderr = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            stderr = tail(self._stderr.read().decode(errors="replace"))
        log.error("writing the lossless intermediate %s failed: %s\n%s", self.path.name, reason, stderr)
        self._abort()
        self.path.unlink(missing_ok=True)
        if NO_SPACE_MESSAGE in stderr:
            raise no_space(self.path.parent, "writing a segment's lossless intermediate") from cause
        raise RestoreError(INTERNAL, f"writing a lossless intermediate failed: {reason}") from cause


def read_lossless(path: Path, width: int, height: int, count: int,
                  what: str = "the intermediate") -> Generator[np.ndarray, None, None]:
    """The frames of a LosslessWriter file, checked to be `count` frames of width x height; INTERNAL otherwise."""
    info = probe_video(path, field=what)  # deinterlace "off": the frames as stored
    if (info.width, info.height, info.frame_count) != (width, height, count):
        raise RestoreError(INTERNAL, f"{what} holds {info.frame_count} frames of {info.width}x{info.height}, "
                                     f"expected {count} of {width}x{height}")
    yield from iter_frames(path, info, field=what)
