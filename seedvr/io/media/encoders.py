"""Output video formats: the codecs, the ffmpeg encoder that writes each, their
quality scales, and the containers that may hold them.

Quality is one constant-quality number per codec, `crf` (lower = better):

    codec  range  default  CPU encoder (first one ffmpeg has)  NVENC encoder
    h264   0-51   18       libx264                              h264_nvenc
    h265   0-51   20       libx265                              hevc_nvenc
    vp9    0-63   30       libvpx-vp9                           -
    av1    0-63   30       libsvtav1, else libaom-av1           av1_nvenc

The defaults give files that look like the restored frames at a reasonable size;
h264's 18 is the value the API has always used. 0 is the finest step each
encoder's scale has (SVT-AV1's starts at 1, so 0 is sent as 1).

NVENC is used when ffmpeg lists the NVIDIA encoder for the codec, the frame size is
within NVENC's limits (sides 160 to 4096, 8192 for HEVC/AV1), AND a one-frame trial
encode with the same options succeeds (data-centre GPUs such as the H100 have no
NVENC unit; most GPUs cannot encode 10-bit H.264); the trial's answer is cached
per process. Its quality setting is `-rc vbr -cq <crf> -b:v 0`, NVENC's
constant-quality mode on the same 0-51 / 0-63 scale. `SEEDVR_DISABLE_NVENC=1`
keeps every encode on the CPU.

Containers: mp4 holds every codec (H.265 tagged `hvc1`, which Apple players need);
webm holds vp9 and av1 only; mkv holds everything. Audio is copied when the
container can hold it, else re-encoded: AAC for mp4, Opus for webm; mkv copies any
codec, and falls back to lossless FLAC for the few Matroska has no id for (DVD and
Blu-ray PCM).
"""

import functools
import logging
import subprocess
from collections.abc import Callable, Collection
from dataclasses import dataclass

from seedvr import settings
from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.media.ffmpeg import ffmpeg_exe

logger = logging.getLogger(__name__)

PIXEL_FORMATS = ("yuv420p", "yuv420p10le")
NVENC_PIXEL_FORMATS = {"yuv420p": "yuv420p", "yuv420p10le": "p010le"}  # NVENC takes 10-bit as P010
NVENC_TRIAL_SIZE = 256  # above every NVENC minimum frame size
# Frame sides NVENC takes (NVIDIA's Video Codec SDK limits; the minimum is rounded up
# from H.264's 145x49); outside them the CPU encoder is used.
NVENC_MIN_SIDE = 160
NVENC_MAX_SIDE = {"h264_nvenc": 4096, "hevc_nvenc": 8192, "av1_nvenc": 8192}
NVENC_TRIAL_TIMEOUT_S = 60
NVENC_PRESET = "p5"  # p1 fastest ... p7 best; p5 is the usual quality/speed middle
VP9_CPU_USED = 4  # libvpx speed 0-8: 4 is several times faster than the default 1, a little larger files
SVT_AV1_PRESET = 8  # SVT-AV1 speed -1..13
AOM_CPU_USED = 6  # libaom speed 0-8; only used when ffmpeg lacks SVT-AV1


@dataclass(frozen=True)
class Codec:
    name: str
    crf_range: tuple[int, int]
    default_crf: int
    cpu_encoders: tuple[str, ...]  # in order of preference
    nvenc_encoder: str | None
    mp4_tag: str | None = None  # the sample entry to write in mp4, when ffmpeg's own is not the usual one


@dataclass(frozen=True)
class Container:
    name: str
    muxer: str  # ffmpeg's name for it, for `-f`
    mime: str
    extension: str  # without the dot
    codecs: tuple[str, ...]
    copied_audio: frozenset[str] | None  # audio codecs kept as they are; None = any
    audio_encoder: tuple[str, ...]  # `-c:a` arguments for every other audio codec
    muxer_options: tuple[str, ...]  # the index at the front, so players can start before the end arrives


CODECS = {
    "h264": Codec("h264", (0, 51), 18, ("libx264",), "h264_nvenc"),
    "h265": Codec("h265", (0, 51), 20, ("libx265",), "hevc_nvenc", mp4_tag="hvc1"),
    "vp9": Codec("vp9", (0, 63), 30, ("libvpx-vp9",), None),
    "av1": Codec("av1", (0, 63), 30, ("libsvtav1", "libaom-av1"), "av1_nvenc"),
}
CONTAINERS = {
    "mp4": Container(
        "mp4", "mp4", "video/mp4", "mp4", ("h264", "h265", "vp9", "av1"),
        frozenset({"aac", "mp3", "alac", "opus", "ac3", "eac3", "flac"}), ("aac", "-b:a", "192k"),
        ("-movflags", "+faststart"),
    ),
    "webm": Container(
        "webm", "webm", "video/webm", "webm", ("vp9", "av1"),
        frozenset({"opus", "vorbis"}), ("libopus", "-b:a", "160k"), ("-cues_to_front", "1"),
    ),
    "mkv": Container(
        "mkv", "matroska", "video/x-matroska", "mkv", ("h264", "h265", "vp9", "av1"),
        None, ("flac",), ("-cues_to_front", "1"),
    ),
}
DEFAULT_CONTAINERS = {"vp9": "webm"}  # every other codec: mp4


def crf_range(codec: str) -> tuple[int, int]:
    """The lowest and highest crf `codec` takes, both included."""
    return _codec(codec).crf_range


def default_crf(codec: str) -> int:
    return _codec(codec).default_crf


def resolve_crf(codec: str, crf: int | None) -> int:
    """`crf`, or the codec's default when None; ValueError outside the codec's range."""
    if crf is None:
        return default_crf(codec)
    low, high = crf_range(codec)
    if isinstance(crf, bool) or not isinstance(crf, int) or not low <= crf <= high:
        raise ValueError(f"crf for {codec} must be an integer between {low} and {high}, got {crf!r}")
    return crf


def container_for(codec: str, container: str | None = None) -> str:
    """The container to write `codec` in: `container`, or mp4 (webm for vp9) when None.

    ValueError when the container cannot hold the codec.
    """
    _codec(codec)
    if container is None:
        return DEFAULT_CONTAINERS.get(codec, "mp4")
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {sorted(CONTAINERS)}, got {container!r}")
    allowed = CONTAINERS[container].codecs
    if codec not in allowed:
        raise ValueError(
            f"a {container} file cannot hold {codec}; use {' or '.join(allowed)} in {container}, "
            f"or put {codec} in {' or '.join(c for c in CONTAINERS if codec in CONTAINERS[c].codecs)}"
        )
    return container


def container_mime(container: str) -> str:
    return CONTAINERS[container].mime


def container_extension(container: str) -> str:
    return CONTAINERS[container].extension


def choose_encoder(
    codec: str,
    pix_fmt: str,
    size: tuple[int, int],
    available: Collection[str],
    nvenc_works: Callable[[str, str], bool],
    allow_nvenc: bool = True,
) -> str:
    """The ffmpeg encoder for `codec` at `size` (width, height): its NVENC encoder when
    allowed, listed in `available`, able to take that size, and `nvenc_works(encoder,
    pix_fmt)` (asked only then); else the first CPU encoder listed. RestoreError
    INTERNAL when ffmpeg has none."""
    spec = _codec(codec)
    nvenc = spec.nvenc_encoder
    if (
        allow_nvenc
        and nvenc is not None
        and nvenc in available
        and all(NVENC_MIN_SIDE <= side <= NVENC_MAX_SIDE[nvenc] for side in size)
        and nvenc_works(nvenc, pix_fmt)
    ):
        return nvenc
    for encoder in spec.cpu_encoders:
        if encoder in available:
            return encoder
    raise RestoreError(INTERNAL, f"this worker's ffmpeg has no {codec} encoder ({', '.join(spec.cpu_encoders)})")


def encoder_pix_fmt(encoder: str, pix_fmt: str) -> str:
    """The pixel format the encoder is fed for the stored format `pix_fmt`."""
    return NVENC_PIXEL_FORMATS[pix_fmt] if encoder.endswith("_nvenc") else pix_fmt


def encoder_options(encoder: str, crf: int, pix_fmt: str) -> list[str]:
    """`-c:v` and the constant-quality options of `encoder` at `crf`, then `-pix_fmt`."""
    if encoder.endswith("_nvenc"):
        # cq 0 means "let NVENC choose"; 1 is its finest step. -b:v 0 lifts the default bitrate cap.
        quality = ["-rc", "vbr", "-cq", str(max(crf, 1)), "-b:v", "0", "-preset", NVENC_PRESET, "-tune", "hq"]
    else:
        quality = {
            "libx264": ["-crf", str(crf)],
            "libx265": ["-crf", str(crf), "-x265-params", "log-level=error"],
            # -b:v 0 makes -crf constant quality instead of a bitrate-capped one.
            "libvpx-vp9": ["-crf", str(crf), "-b:v", "0", "-deadline", "good", "-cpu-used", str(VP9_CPU_USED),
                           "-row-mt", "1"],
            # ffmpeg ignores crf 0 for SVT-AV1 (it means "unset").
            "libsvtav1": ["-crf", str(max(crf, 1)), "-preset", str(SVT_AV1_PRESET)],
            "libaom-av1": ["-crf", str(crf), "-b:v", "0", "-cpu-used", str(AOM_CPU_USED), "-row-mt", "1"],
        }[encoder]
    return ["-c:v", encoder, *quality, "-pix_fmt", encoder_pix_fmt(encoder, pix_fmt)]


def video_encoder(codec: str, pix_fmt: str, size: tuple[int, int]) -> str:
    """The encoder this process uses for `codec` in `pix_fmt` at `size` (width,
    height); see the module docstring."""
    allow_nvenc = not settings.current().disable_nvenc
    return choose_encoder(codec, pix_fmt, size, available_encoders(), nvenc_works, allow_nvenc)


@functools.cache
def available_encoders() -> frozenset[str]:
    """The encoder names `ffmpeg -encoders` lists."""
    completed = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-encoders"],
        capture_output=True, text=True, timeout=NVENC_TRIAL_TIMEOUT_S, check=False,
    )
    listing = completed.stdout.split(" ------", 1)[-1]
    return frozenset(line.split()[1] for line in listing.splitlines() if len(line.split()) >= 2)


@functools.cache
def nvenc_works(encoder: str, pix_fmt: str) -> bool:
    """Whether a one-frame encode with `encoder` succeeds here (driver, GPU and
    session limits permit it), with the options a real encode uses."""
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
        "-f", "lavfi", "-i", f"color=c=gray:s={NVENC_TRIAL_SIZE}x{NVENC_TRIAL_SIZE}:r=25",
        "-frames:v", "1", *encoder_options(encoder, 20, pix_fmt), "-f", "null", "-",
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=NVENC_TRIAL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        logger.warning("%s trial encode timed out; encoding on the CPU", encoder)
        return False
    works = completed.returncode == 0
    if works:
        logger.info("%s works for %s: video is encoded on the GPU", encoder, pix_fmt)
    else:
        logger.info("%s is listed but cannot encode %s here: using the CPU encoder (%s)",
                    encoder, pix_fmt, completed.stderr.strip().splitlines()[-1:] or "no message")
    return works


def _codec(codec: str) -> Codec:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    return CODECS[codec]
