"""Video in and out through the bundled ffmpeg: probe, stream frames, encode.

Frames are uint8 RGB arrays (h, w, 3), always streamed through a rawvideo pipe;
a whole video is never held in memory here.

Frame rate: `VideoInfo.fps` is the exact average rate of the frames, as a Fraction.
It comes from the packet timestamps (count / span). When the container's own rate
is a common one (whole or half fps, or NTSC k*1000/1001) and agrees with the
timestamps to within their rounding, that rate is used: a Matroska file keeps
timestamps in milliseconds, so 8 frames at 30000/1001 span 267 ms, and the
container's "29.97" is what tells 30000/1001 apart from 8000/267. GIF, APNG and
animated WebP store one delay per frame; their rate is the average over all
frames (count / total delay), even when the delays vary; the frames are then
written at that constant average rate.

Output codecs, containers and quality settings are described in
seedvr.io.media.encoders. A webm/mkv output keeps millisecond timestamps too: a rate
that is not a common one (a GIF's 400/13) is written exactly in the track header,
but reads back from a short clip as count / span rounded to the millisecond.
"""

import errno
import io
import itertools
import logging
import os
import subprocess
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import NoReturn, cast

import numpy as np

from seedvr.errors import INTERNAL, INVALID_INPUT, UNSUPPORTED_MEDIA, RestoreError, is_no_space, no_space
from seedvr.io.media.encoders import (
    CODECS,
    CONTAINERS,
    PIXEL_FORMATS,
    container_for,
    encoder_options,
    encoder_pix_fmt,
    resolve_crf,
    video_encoder,
)
from seedvr.io.media.ffmpeg import (
    FfmpegError,
    PacketTiming,
    ffmpeg_exe,
    list_streams,
    packet_timing,
    printed_rate,
    tail,
)

logger = logging.getLogger(__name__)

FRAME_DELAY_CODECS = {"gif", "apng", "webp_anim"}  # one delay per frame, no container rate
MAX_RATE_DENOMINATOR = 1001  # ffmpeg parses rates as num/den <= 1001000; keep them exact
TIMESTAMP_SLACK_TICKS = 2  # a span measured from rounded timestamps is off by < 2 ticks
CHROMA_HALVED = {"yuv420p", "yuv420p10le"}  # need even width and height
ENCODE_TIMEOUT_S = 600  # waiting for ffmpeg to finish after the last frame
ENOSPC_EXIT = 256 - errno.ENOSPC  # ffmpeg's exit status for AVERROR(ENOSPC): its output disk is full
NO_SPACE_MESSAGE = "No space left on device"  # what ffmpeg prints (strerror(ENOSPC)) when its output disk is full


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as decoded: display rotation already applied
    height: int
    frame_count: int
    fps: Fraction  # exact average frame rate, e.g. Fraction(30000, 1001)
    duration: float  # seconds, frame_count / fps
    has_audio: bool
    audio_codec: str | None  # ffmpeg's codec name of the first audio stream, e.g. "aac"
    pix_fmt: str | None  # of the stored video, e.g. "yuv420p"
    codec: str  # e.g. "h264"
    rotation: int  # display rotation in degrees stored in the file, 0 when none
    stream_index: int  # the video stream used, as `-map 0:<stream_index>`


def probe_video(path: str | Path, field: str = "video") -> VideoInfo:
    """Everything needed to decode and re-encode a video, without decoding it."""
    try:
        streams = list_streams(Path(path))
        video = next((s for s in streams if s.kind == "video" and not s.attached_pic), None)
        if video is None:
            raise RestoreError(
                UNSUPPORTED_MEDIA, f"{field} has no video stream; send a file with video in it"
            )
        timing = packet_timing(Path(path), video.index)
    except FfmpegError as err:
        logger.error("ffmpeg could not probe %s: %s\n%s", field, err, err.stderr_tail)
        raise RestoreError(
            INVALID_INPUT, f"{field} cannot be read as a video ({err}); the file may be damaged or truncated"
        ) from err
    if video.width is None or video.height is None:
        raise RestoreError(INVALID_INPUT, f"{field} has a video stream of unknown size")
    audio = next((s for s in streams if s.kind == "audio"), None)
    fps = _frame_rate(video.codec, video.printed_rates, timing, field)
    turned = video.rotation % 180 == 90
    return VideoInfo(
        width=video.height if turned else video.width,
        height=video.width if turned else video.height,
        frame_count=timing.count,
        fps=fps,
        duration=float(timing.count / fps),
        has_audio=audio is not None,
        audio_codec=audio.codec if audio else None,
        pix_fmt=video.pix_fmt,
        codec=video.codec,
        rotation=video.rotation,
        stream_index=video.index,
    )


def iter_frames(path: str | Path, info: VideoInfo, field: str = "video") -> Generator[np.ndarray, None, None]:
    """Yield exactly `info.frame_count` frames, uint8 (height, width, 3), in order.

    Raises INVALID_INPUT when the decoder produces another number of frames
    (a damaged file). Stopping early (break, close()) kills ffmpeg.
    """
    # The scale filter pins the frame size even if the stream changes size midway;
    # ffmpeg has already applied the display rotation before it.
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(path),
        "-map", f"0:{info.stream_index}", "-vf", f"scale={info.width}:{info.height}",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1",
    ]
    frame_bytes = info.width * info.height * 3
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        try:
            assert process.stdout is not None  # stdout=PIPE
            produced = 0
            stdout = cast(io.BufferedReader, process.stdout)  # a buffered pipe: Popen's default bufsize
            while (frame := _read_frame(stdout, frame_bytes)) is not None:
                produced += 1
                if produced > info.frame_count:
                    break
                yield frame.reshape(info.height, info.width, 3)
            process.stdout.close()
            returncode = process.wait()
            if returncode != 0 or produced != info.frame_count:
                stderr.seek(0)
                logger.error(
                    "decoding %s: ffmpeg exited with %s after %d of %d frames\n%s",
                    field, returncode, produced, info.frame_count, tail(stderr.read().decode(errors="replace")),
                )
                raise RestoreError(
                    INVALID_INPUT,
                    f"{field} could not be decoded completely (got {produced} frames where its index "
                    f"lists {info.frame_count}); the file may be damaged; re-encode it and send it again",
                )
        finally:
            _stop(process)


def read_frames(path: str | Path, info: VideoInfo, start: int = 0, count: int | None = None) -> np.ndarray:
    """Frames [start, start + count) as one uint8 array (count, height, width, 3)."""
    stop = info.frame_count if count is None else min(start + count, info.frame_count)
    frames = iter_frames(path, info)
    try:
        return np.stack(list(itertools.islice(frames, start, stop)))
    finally:
        frames.close()


class VideoWriter:
    """Encode RGB frames at the constant frame rate `fps`, tagged BT.709.

    with VideoWriter(path, width, height, fps, audio_source=source, codec="h265") as writer:
        for frame in frames:  # uint8 (height, width, 3)
            writer.write(frame)

    `codec`, `crf` (None: the codec's default), `pix_fmt` and `container` (None:
    mp4, webm for vp9) are described in seedvr.io.media.encoders; ValueError for a
    value out of range or a container that cannot hold the codec. The first audio
    stream of `audio_source`, cut to the video's duration, is muxed in after the
    frames are encoded, copied or re-encoded as the container requires. Odd sizes
    are padded by repeating the last row/column (4:2:0 needs even ones). Leaving
    the block checks that the file holds exactly the frames written; ffmpeg is
    killed and partial files are removed on every path out.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: Fraction,
        audio_source: str | Path | None = None,
        codec: str = "h264",
        crf: int | None = None,
        pix_fmt: str = "yuv420p",
        container: str | None = None,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
        if pix_fmt not in PIXEL_FORMATS:
            raise ValueError(f"pix_fmt must be one of {sorted(PIXEL_FORMATS)}, got {pix_fmt!r}")
        fps = Fraction(fps)
        if fps <= 0 or fps.denominator > MAX_RATE_DENOMINATOR:
            raise ValueError(f"fps must be positive with a denominator <= {MAX_RATE_DENOMINATOR}, got {fps}")
        self.codec, self.crf, self.pix_fmt = codec, resolve_crf(codec, crf), pix_fmt
        self.container = container_for(codec, container)
        self.encoder = video_encoder(codec, pix_fmt, (width, height))
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.audio_source = Path(audio_source) if audio_source is not None else None
        self.frames_written = 0
        halved = pix_fmt in CHROMA_HALVED
        self._pad = (height % 2 if halved else 0, width % 2 if halved else 0)
        spec = CONTAINERS[self.container]
        intermediate = self.path.with_name(f"{self.path.stem}.video-only.{spec.extension}")
        self._video_path = intermediate if audio_source else self.path
        self._stderr = tempfile.TemporaryFile()
        rate = f"{fps.numerator}/{fps.denominator}"
        command = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width + self._pad[1]}x{height + self._pad[0]}",
            "-framerate", rate, "-i", "pipe:0",
            # sRGB shares BT.709's primaries; without setparams only the matrix gets tagged.
            # The scale filter also does the 8-bit -> 10-bit conversion for yuv420p10le.
            "-vf", "setparams=color_primaries=bt709:color_trc=bt709,"
            f"scale=out_color_matrix=bt709:out_range=tv,format={encoder_pix_fmt(self.encoder, pix_fmt)}",
            *encoder_options(self.encoder, self.crf, pix_fmt), *self._video_tag(),
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
            "-fps_mode", "cfr", "-r", rate, *spec.muxer_options, "-f", spec.muxer, str(self._video_path),
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    @property
    def mime(self) -> str:
        return CONTAINERS[self.container].mime

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"frame must be uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {frame.shape}"
            )
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        assert self._process.stdin is not None  # stdin=PIPE
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError) as err:  # ffmpeg died / pipe already closed
            self._fail(f"ffmpeg stopped accepting frames after {self.frames_written}", err)
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file: flush the encoder, mux the audio, check the frame count."""
        assert self._process.stdin is not None  # stdin=PIPE
        if self._process.stdin.closed:
            return
        try:
            self._process.stdin.close()
            returncode = self._process.wait(timeout=ENCODE_TIMEOUT_S)
        except (BrokenPipeError, subprocess.TimeoutExpired) as err:
            self._fail("ffmpeg did not finish the video", err)
        if returncode != 0:
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if returncode == ENOSPC_EXIT else None
            self._fail(f"ffmpeg exited with {returncode}", full)
        try:
            if self._video_path != self.path:
                self._mux_audio()
            written = packet_timing(self.path, 0).count
        except FfmpegError as err:
            self._fail(str(err), err)
        finally:
            self._abort()
        if written != self.frames_written:
            self._fail(f"the encoded file holds {written} frames, {self.frames_written} were written")

    def _mux_audio(self) -> None:
        assert self.audio_source is not None  # only a writer with an audio source writes video-only first
        audio = next((s for s in list_streams(self.audio_source) if s.kind == "audio"), None)
        if audio is None:
            self._video_path.replace(self.path)
            return
        spec = CONTAINERS[self.container]
        copied = spec.copied_audio is None or audio.codec in spec.copied_audio
        # A container that copies "anything" still lacks ids for a few codecs: re-encode those.
        attempts = [["copy"]] if copied else []
        if spec.copied_audio is None or not copied:
            attempts.append(list(spec.audio_encoder))
        duration = self.frames_written / self.fps
        for number, audio_codec in enumerate(attempts, start=1):
            command = [
                ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                "-i", str(self._video_path), "-t", f"{float(duration):.6f}", "-i", str(self.audio_source),
                "-map", "0:v:0", "-map", f"1:{audio.index}", "-c:v", "copy", *self._video_tag(),
                "-c:a", *audio_codec, "-map_metadata", "-1", *spec.muxer_options,
                "-f", spec.muxer, str(self.path),
            ]
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=ENCODE_TIMEOUT_S, check=False
            )
            if completed.returncode == 0:
                return
            if number < len(attempts):
                logger.warning("%s audio cannot be copied into %s, re-encoding it:\n%s",
                               audio.codec, self.container, tail(completed.stderr))
        raise FfmpegError("ffmpeg could not mux the audio", tail(completed.stderr))

    def _video_tag(self) -> list[str]:
        tag = CODECS[self.codec].mp4_tag if self.container == "mp4" else None
        return ["-tag:v", tag] if tag else []

    def _abort(self) -> None:
        """Stop ffmpeg (if still running) and drop the intermediate file."""
        _stop(self._process)
        if self._video_path != self.path:
            self._video_path.unlink(missing_ok=True)
        self._stderr.close()

    def _fail(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        """Log ffmpeg's last words, remove any partial output, raise INTERNAL."""
        if isinstance(cause, FfmpegError):
            stderr = cause.stderr_tail
        elif not self._stderr.closed:
            self._stderr.seek(0)
            stderr = tail(self._stderr.read().decode(errors="replace"))
        else:
            stderr = ""
        logger.error("encoding %s failed: %s\n%s", self.path.name, reason, stderr)
        self._abort()
        self.path.unlink(missing_ok=True)
        if NO_SPACE_MESSAGE in stderr or is_no_space(cause):
            raise no_space(self.path.parent, "encoding the restored video") from cause
        raise RestoreError(INTERNAL, f"video encoding failed: {reason}") from cause


def _frame_rate(codec: str, printed_rates: tuple[str, ...], timing: PacketTiming, field: str) -> Fraction:
    """The exact average frame rate; see the module docstring."""
    slack = TIMESTAMP_SLACK_TICKS * timing.time_base
    if codec not in FRAME_DELAY_CODECS:
        for text in printed_rates:
            rate = printed_rate(text)
            if rate is not None and (timing.span == 0 or abs(timing.count / rate - timing.span) <= slack):
                return rate
    if timing.span <= 0:
        raise RestoreError(INVALID_INPUT, f"{field} has no frame timing; re-encode it with a frame rate")
    return (timing.count / timing.span).limit_denominator(MAX_RATE_DENOMINATOR)


def _read_frame(stream: io.BufferedIOBase, size: int) -> np.ndarray | None:
    """The next `size` bytes as a writable uint8 array; None at the end of the stream."""
    buffer = bytearray(size)
    view, filled = memoryview(buffer), 0
    while filled < size:
        read = stream.readinto(view[filled:])
        if not read:
            return None  # a partial frame at the end is not a frame
        filled += read
    return np.frombuffer(buffer, dtype=np.uint8)


def _stop(process: subprocess.Popen) -> None:
    """Kill ffmpeg if it still runs, and reap it (no zombie)."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None and not pipe.closed:
            try:
                pipe.close()
            except BrokenPipeError:
                pass
