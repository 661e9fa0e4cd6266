"""Raw RGB frames piped into one ffmpeg process that writes a file: the life cycle every frame writer shares.

A subclass builds the ffmpeg command (it reads rgb24 frames of the piped size from `pipe:0`) and may finish
the file once ffmpeg has (`_after_encode`, e.g. re-timing). Leaving the `with` block checks that the file holds
exactly the frames written; ffmpeg is killed and partial files are removed on every path out. A failure raises
NO_SPACE when the disk is full, else INTERNAL, with ffmpeg's last words in the log only.
"""

import errno
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, TypeVar

import numpy as np

from seedvr.errors import INTERNAL, RestoreError, is_no_space, no_space
from seedvr.io.media.ffmpeg import FfmpegError, packet_timing, tail
from seedvr.io.media.video import stop_process

logger = logging.getLogger(__name__)

Writer = TypeVar("Writer", bound="FramePipeWriter")

FINISH_TIMEOUT_S = 600  # waiting for ffmpeg to finish after the last frame
ENOSPC_EXIT = 256 - errno.ENOSPC  # ffmpeg's exit status for AVERROR(ENOSPC): its output disk is full
NO_SPACE_MESSAGE = "No space left on device"  # what ffmpeg prints (strerror(ENOSPC)) when its output disk is full


class FramePipeWriter:
    """Frames uint8 (height, width, 3) into `path` through ffmpeg; see the module docstring. `pad` (rows,
    columns) repeats the last row/column of each frame for encoders that need even sides."""

    failure = "writing the video failed"  # how an error starts
    doing = "writing the video"  # what a full disk stopped

    def __init__(self, path: Path, width: int, height: int, pad: tuple[int, int] = (0, 0)) -> None:
        self.path, self.width, self.height = Path(path), width, height
        self.frames_written = 0
        self._pad = pad
        self._intermediates: list[Path] = []  # removed on every path out
        self._stderr = tempfile.TemporaryFile()
        self._process: subprocess.Popen | None = None

    @property
    def piped_size(self) -> str:
        """The rawvideo size ffmpeg reads, padding included: `-s` WIDTHxHEIGHT."""
        return f"{self.width + self._pad[1]}x{self.height + self._pad[0]}"

    def _start(self, command: list[str]) -> None:
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr)

    def __enter__(self: Writer) -> Writer:
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
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        stdin = self._stdin()
        try:
            stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError) as err:  # ffmpeg died / pipe already closed
            self._fail(f"ffmpeg stopped accepting frames after {self.frames_written}", err)
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file: flush the encoder, `_after_encode`, check the frame count."""
        stdin = self._stdin()
        if stdin.closed:
            return
        assert self._process is not None, "started"
        try:
            stdin.close()
            returncode = self._process.wait(timeout=FINISH_TIMEOUT_S)
        except (BrokenPipeError, subprocess.TimeoutExpired) as err:
            self._fail("ffmpeg did not finish", err)
        if returncode != 0:
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if returncode == ENOSPC_EXIT else None
            self._fail(f"ffmpeg exited with {returncode}", full)
        try:
            self._after_encode()
            written = packet_timing(self.path, 0).count
        except FfmpegError as err:
            self._fail(str(err), err)
        except OSError as err:  # PyAV's errors, a full disk among them
            self._fail(str(err), err)
        finally:
            self._abort()
        if written != self.frames_written:
            self._fail(f"the file holds {written} frames, {self.frames_written} were written")

    def _after_encode(self) -> None:
        """What finishes the file once ffmpeg has written it; nothing by default."""

    def _stdin(self) -> IO[bytes]:
        assert self._process is not None and self._process.stdin is not None, "started with stdin=PIPE"
        return self._process.stdin

    def _abort(self) -> None:
        """Stop ffmpeg (if still running) and drop the intermediate files."""
        if self._process is not None:
            stop_process(self._process)
        for path in self._intermediates:
            path.unlink(missing_ok=True)
        self._stderr.close()

    def _fail(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        """Log ffmpeg's last words, remove any partial output, raise NO_SPACE or INTERNAL."""
        if isinstance(cause, FfmpegError):
            stderr = cause.stderr_tail
        elif not self._stderr.closed:
            self._stderr.seek(0)
            stderr = tail(self._stderr.read().decode(errors="replace"))
        else:
            stderr = ""
        logger.error("%s (%s): %s\n%s", self.doing, self.path.name, reason, stderr)
        self._abort()
        self.path.unlink(missing_ok=True)
        if NO_SPACE_MESSAGE in stderr or is_no_space(cause):
            raise no_space(self.path.parent, self.doing) from cause
        raise RestoreError(INTERNAL, f"{self.failure}: {reason}") from cause
