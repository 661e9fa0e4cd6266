"""Restored frames out: one ffmpeg process encodes the frames and muxes the source's audio in the same pass.

    with VideoWriter(path, width, height, fps, audio_source=source, codec="h265") as writer:
        for frame in frames:  # uint8 (height, width, 3)
            writer.write(frame)

Timing: frames are encoded at the constant rate `fps`; with `frame_times` (a variable-frame-rate source)
the encoded packets are then given the source's own timestamps (seedvr.io.media.retime), so every frame
shows when it showed in the source. The audio is never stretched, and cut only to the part of the source
a request restores (`audio_window`): the first audio stream of `audio_source` is copied, or re-encoded where
the container cannot hold it (seedvr.io.media.encoders); a cut copy starts at the packet nearest the cut.

Colour: the output carries the source's colour description where the source has one (`color`: matrix,
primaries, transfer, range), BT.709 limited range otherwise; the RGB frames are converted to YUV with the
same matrix the reader used to make them RGB, so colours round-trip. Pixels are square (SAR 1:1).
"""

import logging
from fractions import Fraction
from pathlib import Path

from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.media.encoders import (
    CODECS,
    CONTAINERS,
    PIXEL_FORMATS,
    audio_codec_args,
    container_for,
    encoder_options,
    encoder_pix_fmt,
    frame_padding,
    resolve_crf,
    video_encoder,
    video_tag,
)
from seedvr.io.media.ffmpeg import ColorTags, FfmpegError, ffmpeg_exe, list_streams
from seedvr.io.media.frame_pipe import FramePipeWriter
from seedvr.io.media.retime import retime
from seedvr.io.media.video import FrameTimes

logger = logging.getLogger(__name__)

MAX_RATE_DENOMINATOR = 1001  # ffmpeg parses rates as num/den <= 1001000; keep them exact
DEFAULT_COLOR = ColorTags("tv", "bt709", "bt709", "bt709")
# The matrices the scale filter can convert RGB with: ffmpeg's tag name -> the scale filter's name.
SCALE_MATRICES = {"bt709": "bt709", "bt470bg": "bt470", "smpte170m": "smpte170m", "smpte240m": "smpte240m",
                  "fcc": "fcc", "bt2020nc": "bt2020"}


def output_color(source: ColorTags | None) -> ColorTags:
    """The tags to write: the source's, each one it leaves unset taken from BT.709 limited range; all of
    BT.709 when the source's matrix is one the RGB -> YUV conversion cannot use."""
    if source is None or (source.matrix is not None and source.matrix not in SCALE_MATRICES):
        return DEFAULT_COLOR
    return ColorTags(source.range or DEFAULT_COLOR.range, source.matrix or DEFAULT_COLOR.matrix,
                     source.primaries or DEFAULT_COLOR.primaries, source.transfer or DEFAULT_COLOR.transfer)


class VideoWriter(FramePipeWriter):
    """Encode RGB frames into `path`; see the module docstring.

    `codec`, `crf` (None: the codec's default), `pix_fmt` and `container` (None: the codec's usual one)
    are described in seedvr.io.media.encoders; ValueError for a value out of range or a container that
    cannot hold the codec. Odd sizes are padded by repeating the last row/column where the codec and pixel
    format need even ones (seedvr.io.media.encoders.frame_padding). The life cycle (checks, clean-up,
    errors) is seedvr.io.media.frame_pipe's.
    """

    failure = "video encoding failed"
    doing = "encoding the restored video"

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
        frame_times: FrameTimes | None = None,
        color: ColorTags | None = None,
        audio_window: tuple[float, float] | None = None,
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
        super().__init__(Path(path), width, height, frame_padding(codec, pix_fmt, width, height))
        self.fps = fps
        self.frame_times = frame_times
        self.color = output_color(color)
        spec = CONTAINERS[self.container]
        # A variable rate is encoded at the constant average rate first, then given the source's timestamps.
        self._encoded_path = self.path
        if frame_times is not None:
            self._encoded_path = self.path.with_name(f"{self.path.stem}.constant-rate.{spec.extension}")
            self._intermediates.append(self._encoded_path)
        rate = f"{fps.numerator}/{fps.denominator}"
        color_tags = self.color
        audio = self._audio_input(Path(audio_source) if audio_source is not None else None, audio_window)
        self._start([
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", self.piped_size, "-framerate", rate, "-i", "pipe:0",
            *audio,
            # Without setparams only the matrix gets tagged; the scale filter converts with the tagged
            # matrix and range (and does the 8-bit -> 10-bit conversion for the 10-bit formats).
            "-vf", f"setparams=color_primaries={color_tags.primaries}:color_trc={color_tags.transfer},"
            f"scale=out_color_matrix={SCALE_MATRICES[str(color_tags.matrix)]}:out_range={color_tags.range},"
            f"format={encoder_pix_fmt(self.encoder, pix_fmt)},setsar=1",
            *encoder_options(self.encoder, self.crf, pix_fmt), *self._video_tag(),
            "-colorspace", str(color_tags.matrix), "-color_primaries", str(color_tags.primaries),
            "-color_trc", str(color_tags.transfer), "-color_range", str(color_tags.range),
            "-fps_mode", "cfr", "-r", rate, "-map_metadata", "-1", *spec.muxer_options,
            "-f", spec.muxer, str(self._encoded_path),
        ])

    @property
    def mime(self) -> str:
        return CONTAINERS[self.container].mime

    def _after_encode(self) -> None:
        """A variable rate: the constant-rate packets get the source's timestamps."""
        if self.frame_times is None:
            return
        if len(self.frame_times.starts) != self.frames_written:
            self._fail(f"{self.frames_written} frames were written for {len(self.frame_times.starts)} timestamps")
        retime(self._encoded_path, self.path, self.frame_times, self.fps, CONTAINERS[self.container])

    def _audio_input(self, source: Path | None, window: tuple[float, float] | None) -> list[str]:
        """The ffmpeg arguments that add the first audio stream of `source`, copied or re-encoded; only
        `window` (start, duration in seconds) of it when given."""
        if source is None:
            return ["-map", "0:v:0"]
        try:
            audio = next((s for s in list_streams(source) if s.kind == "audio"), None)
        except FfmpegError as err:
            logger.error("the audio source of %s cannot be read: %s\n%s", self.path.name, err, err.stderr_tail)
            raise RestoreError(INTERNAL, "video encoding failed: the source's audio cannot be read") from err
        if audio is None:
            return ["-map", "0:v:0"]
        codec = audio_codec_args(self.container, audio.codec)
        cut = ["-ss", f"{window[0]:.6f}", "-t", f"{window[1]:.6f}"] if window is not None else []
        return [*cut, "-i", str(source), "-map", "0:v:0", "-map", f"1:{audio.index}", "-c:a", *codec]

    def _video_tag(self) -> list[str]:
        tag = video_tag(self.codec, self.container)
        return ["-tag:v", tag] if tag else []
