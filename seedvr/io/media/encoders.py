"""Output video formats: the codecs, the ffmpeg encoder that writes each, their
quality scales, pixel formats and the containers that may hold them.

Quality is one constant-quality number per codec, `crf` (lower = better):

    codec   crf    default  CPU encoder (first one ffmpeg has)  NVENC encoder
    h264    0-51   18       libx264                              h264_nvenc
    h265    0-51   20       libx265                              hevc_nvenc
    vp9     0-63   30       libvpx-vp9                           -
    av1     0-63   30       libsvtav1, else libaom-av1           av1_nvenc
    prores  -      -        prores_ks                            -
    ffv1    -      -        ffv1                                 -

The defaults give files that look like the restored frames at a reasonable size;
h264's 18 is the value the API has always used. 0 is the finest step each
encoder's scale has (SVT-AV1's starts at 1, so 0 is sent as 1). ProRes and FFV1
take no crf (a crf for them is refused, not ignored): ProRes's quality is set by
its profile, coded at the profile's data rate (prores_ks's per-profile target, as
editing software exports it), and FFV1 is lossless. ProRes is 422 HQ (profile 3,
yuv422p10le), or 4444 (profile 4, yuv444p10le) when pix_fmt is yuv444p or
yuv444p10le. FFV1 is written as archives do: version 3, every frame a keyframe,
range coder, 24 slices with CRCs.

Pixel formats (`pix_fmt`), each stored as asked except by ProRes:

    pix_fmt      chroma  bits  sides that must be even  ProRes stores
    yuv420p      4:2:0   8     width and height         yuv422p10le (422 HQ)
    yuv420p10le  4:2:0   10    width and height         yuv422p10le (422 HQ)
    yuv444p      4:4:4   8     none                     yuv444p10le (4444)
    yuv444p10le  4:4:4   10    none                     yuv444p10le (4444)

ProRes never stores less chroma or fewer bits than asked (ffmpeg decodes 4444 as
yuv444p12le: the profile allows 12 bits). ProRes and FFV1 code odd sizes as they
are; the other codecs get an odd side padded where the table asks for an even
one (`frame_padding`). SVT-AV1 codes 4:2:0 only, so av1 in 4:4:4 is libaom-av1's
(several times slower).

NVENC is used when ffmpeg lists the NVIDIA encoder for the codec, the encoder takes
the pixel format (4:4:4: h264_nvenc 8-bit only, as High 4:4:4 Predictive;
hevc_nvenc 8- and 10-bit, as RExt; av1_nvenc none, NVENC's AV1 is 4:2:0), the frame
size is within NVENC's limits (sides 160 to 4096, 8192 for HEVC/AV1; even in
4:4:4), AND a one-frame trial encode with the same options succeeds (data-centre
GPUs such as the H100 have no NVENC unit; most GPUs cannot encode 10-bit H.264);
the trial's answer is cached per process. Its quality setting is
`-rc vbr -cq <crf> -b:v 0`, NVENC's constant-quality mode on the same 0-51 / 0-63
scale. `SEEDVR_DISABLE_NVENC=1` keeps every encode on the CPU.

Containers, and the audio each keeps (the source's first audio stream is copied
when the container lists its codec, else re-encoded):

    container  mime              codecs                 audio copied                         else
    mp4        video/mp4         h264 h265 vp9 av1      AAC, MP3, AC-3, E-AC-3               AAC 192k
    mov        video/quicktime   h264 h265 prores       AAC, ALAC, MP3, AC-3, E-AC-3, PCM    PCM 24-bit
    mkv        video/x-matroska  all six                the codecs Matroska has an id for    FLAC
    webm       video/webm        vp9 av1                Opus, Vorbis                         Opus 160k

The default container is mp4; webm for vp9, mov for prores, mkv for ffv1 (FFV1 is
in no other container's specification). mp4 copies only what players play from
mp4 (many stay silent on Opus or FLAC in mp4). mov copies what QuickTime and
editing software read; ffmpeg's muxer refuses Opus, FLAC and DVD PCM in mov, and
would write Vorbis or WMA into files QuickTime cannot play, so those and every
other codec become 24-bit PCM, which keeps a lossless source lossless. mkv copies
every codec with a Matroska id (`MATROSKA_AUDIO`); the rest (DVD and Blu-ray PCM,
ADPCM, WMA, AMR) become lossless FLAC. `audio_codec_args` gives the `-c:a`
arguments. H.265 is tagged `hvc1` in mp4 and mov (`video_tag`), which Apple
players need.
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

PIXEL_FORMATS = ("yuv420p", "yuv420p10le", "yuv444p", "yuv444p10le")
# (width, height) must be even: chroma planes of half the width (4:2:2) or of half both sides (4:2:0).
EVEN_SIDES = {
    "yuv420p": (True, True), "yuv420p10le": (True, True),
    "yuv422p10le": (True, False),
    "yuv444p": (False, False), "yuv444p10le": (False, False),
}
PRORES_STORES = {"yuv420p": "yuv422p10le", "yuv420p10le": "yuv422p10le",
                 "yuv444p": "yuv444p10le", "yuv444p10le": "yuv444p10le"}
PRORES_PROFILES = {"yuv422p10le": "3", "yuv444p10le": "4"}  # prores_ks: 3 = 422 HQ, 4 = 4444
PRORES_VENDOR = "apl0"  # the vendor id Apple's encoders write; some Apple software checks it
FFV1_OPTIONS = ("-level", "3", "-g", "1", "-coder", "range_tab", "-context", "1", "-slices", "24", "-slicecrc", "1")
# The formats each encoder is fed for the pixel formats it takes, where they differ from "every
# PIXEL_FORMATS entry as itself". NVENC takes 10-bit as P010 (4:2:0) or MSB-aligned planes (4:4:4).
ENCODER_INPUTS = {
    "h264_nvenc": {"yuv420p": "yuv420p", "yuv420p10le": "p010le", "yuv444p": "yuv444p"},
    "hevc_nvenc": {"yuv420p": "yuv420p", "yuv420p10le": "p010le", "yuv444p": "yuv444p",
                   "yuv444p10le": "yuv444p10msble"},
    "av1_nvenc": {"yuv420p": "yuv420p", "yuv420p10le": "p010le"},
    "libsvtav1": {"yuv420p": "yuv420p", "yuv420p10le": "yuv420p10le"},
    "prores_ks": PRORES_STORES,
}
NVENC_444_PROFILES = {"h264_nvenc": "high444p", "hevc_nvenc": "rext"}
NVENC_TRIAL_SIZE = 256  # above every NVENC minimum frame size
# Frame sides NVENC takes (NVIDIA's Video Codec SDK limits; the minimum is rounded up
# from H.264's 145x49); outside them the CPU encoder is used.
NVENC_MIN_SIDE = 160
NVENC_MAX_SIDE = {"h264_nvenc": 4096, "hevc_nvenc": 8192, "av1_nvenc": 8192}
NVENC_TRIAL_TIMEOUT_S = 60
NVENC_PRESET = "p5"  # p1 fastest ... p7 best; p5 is the usual quality/speed middle
VP9_CPU_USED = 4  # libvpx speed 0-8: 4 is several times faster than the default 1, a little larger files
SVT_AV1_PRESET = 8  # SVT-AV1 speed -1..13
AOM_CPU_USED = 6  # libaom speed 0-8; used when ffmpeg lacks SVT-AV1, and for 4:4:4
ISO_CONTAINERS = {"mp4", "mov"}  # they name a stream's codec by its sample entry (see Codec.mp4_tag)
PCM_CODECS = frozenset({
    "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be",
    "pcm_f32le", "pcm_f32be", "pcm_f64le", "pcm_f64be", "pcm_u8", "pcm_s8", "pcm_alaw", "pcm_mulaw",
})
# Audio codecs with a Matroska codec id (A_AAC, A_AC3, A_PCM/INT/LIT, ...), as ffmpeg names them.
MATROSKA_AUDIO = frozenset({
    "aac", "ac3", "eac3", "dts", "truehd", "mlp", "mp1", "mp2", "mp3", "opus", "vorbis", "flac", "alac",
    "wavpack", "tta", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be",
    "pcm_f32le", "pcm_f64le", "pcm_u8",
})


@dataclass(frozen=True)
class Codec:
    name: str
    crf_range: tuple[int, int] | None  # None: the codec takes no crf, `fixed_quality` says why
    default_crf: int | None
    cpu_encoders: tuple[str, ...]  # in order of preference; the first that takes the pixel format is used
    nvenc_encoder: str | None
    mp4_tag: str | None = None  # the sample entry to write in mp4 and mov, when ffmpeg's own is not the usual one
    fixed_quality: str = ""  # what sets the quality of a codec without crf, for the error message
    odd_sides: bool = False  # codes odd frame sizes as they are in every pixel format: never padded
    stores: tuple[tuple[str, str], ...] = ()  # (pix_fmt asked, pix_fmt stored) where the codec has its own


@dataclass(frozen=True)
class Container:
    name: str
    muxer: str  # ffmpeg's name for it, for `-f`
    mime: str
    extension: str  # without the dot
    codecs: tuple[str, ...]
    copied_audio: frozenset[str]  # audio codecs (ffmpeg's names) kept as they are
    audio_encoder: tuple[str, ...]  # `-c:a` arguments for every other audio codec
    muxer_options: tuple[str, ...]  # the index at the front, so players can start before the end arrives


CODECS = {
    "h264": Codec("h264", (0, 51), 18, ("libx264",), "h264_nvenc"),
    "h265": Codec("h265", (0, 51), 20, ("libx265",), "hevc_nvenc", mp4_tag="hvc1"),
    "vp9": Codec("vp9", (0, 63), 30, ("libvpx-vp9",), None),
    "av1": Codec("av1", (0, 63), 30, ("libsvtav1", "libaom-av1"), "av1_nvenc"),
    "prores": Codec("prores", None, None, ("prores_ks",), None, odd_sides=True,
                    fixed_quality="its profile sets the quality: 422 HQ, or 4444 for pix_fmt yuv444p/yuv444p10le",
                    stores=tuple(PRORES_STORES.items())),
    "ffv1": Codec("ffv1", None, None, ("ffv1",), None, odd_sides=True, fixed_quality="it is lossless"),
}
CONTAINERS = {
    "mp4": Container(
        "mp4", "mp4", "video/mp4", "mp4", ("h264", "h265", "vp9", "av1"),
        frozenset({"aac", "mp3", "ac3", "eac3"}), ("aac", "-b:a", "192k"), ("-movflags", "+faststart"),
    ),
    "mov": Container(
        "mov", "mov", "video/quicktime", "mov", ("h264", "h265", "prores"),
        frozenset({"aac", "alac", "mp3", "ac3", "eac3"}) | PCM_CODECS, ("pcm_s24le",), ("-movflags", "+faststart"),
    ),
    "webm": Container(
        "webm", "webm", "video/webm", "webm", ("vp9", "av1"),
        frozenset({"opus", "vorbis"}), ("libopus", "-b:a", "160k"), ("-cues_to_front", "1"),
    ),
    "mkv": Container(
        "mkv", "matroska", "video/x-matroska", "mkv", ("h264", "h265", "vp9", "av1", "prores", "ffv1"),
        MATROSKA_AUDIO, ("flac",), ("-cues_to_front", "1"),
    ),
}
DEFAULT_CONTAINERS = {"vp9": "webm", "prores": "mov", "ffv1": "mkv"}  # every other codec: mp4


def crf_range(codec: str) -> tuple[int, int] | None:
    """The lowest and highest crf `codec` takes, both included; None when it takes none."""
    return _codec(codec).crf_range


def default_crf(codec: str) -> int | None:
    return _codec(codec).default_crf


def crf_problem(codec: str, crf: object) -> str | None:
    """Why `crf` does not suit `codec` (None is always fine: the codec's default), or None."""
    spec = _codec(codec)
    if crf is None:
        return None
    if spec.crf_range is None:
        return f"crf does not apply to {codec} ({spec.fixed_quality}): send crf null or leave it out"
    low, high = spec.crf_range
    if isinstance(crf, bool) or not isinstance(crf, int):
        return f"crf for {codec} must be an integer between {low} and {high}, got {crf!r}"
    if not low <= crf <= high:
        return f"crf for {codec} must be between {low} and {high}, got {crf}"
    return None


def resolve_crf(codec: str, crf: int | None) -> int | None:
    """`crf`, or the codec's default when None (None for a codec without crf); ValueError for a crf the
    codec does not take."""
    if problem := crf_problem(codec, crf):
        raise ValueError(problem)
    return default_crf(codec) if crf is None else crf


def stored_pix_fmt(codec: str, pix_fmt: str) -> str:
    """The pixel format the file holds when `pix_fmt` is asked of `codec` (see the module docstring)."""
    return dict(_codec(codec).stores).get(_pix_fmt(pix_fmt), pix_fmt)


def even_sides(codec: str, pix_fmt: str) -> tuple[bool, bool]:
    """Whether the (width, height) `codec` codes in `pix_fmt` must be even."""
    if _codec(codec).odd_sides:
        return False, False
    return EVEN_SIDES[stored_pix_fmt(codec, pix_fmt)]


def frame_padding(codec: str, pix_fmt: str, width: int, height: int) -> tuple[int, int]:
    """(rows, columns) to add below and right of a width x height frame so that `codec` can code it in
    `pix_fmt`: 1 for an odd side that must be even, else 0."""
    even_width, even_height = even_sides(codec, pix_fmt)
    return (height % 2 if even_height else 0), (width % 2 if even_width else 0)


def container_for(codec: str, container: str | None = None) -> str:
    """The container to write `codec` in: `container`, or the codec's default when None (mp4; webm for
    vp9, mov for prores, mkv for ffv1).

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


def video_tag(codec: str, container: str) -> str | None:
    """The `-tag:v` to write `codec` with in `container`, when ffmpeg's default is not the usual one."""
    return _codec(codec).mp4_tag if container in ISO_CONTAINERS else None


def audio_codec_args(container: str, audio_codec: str) -> list[str]:
    """`-c:a` arguments that put an audio stream of `audio_codec` (ffmpeg's name) into `container`:
    ["copy"] when the container keeps that codec, else the container's encoder and its options."""
    spec = CONTAINERS[container]
    return ["copy"] if audio_codec in spec.copied_audio else list(spec.audio_encoder)


def encoder_takes(encoder: str, pix_fmt: str) -> bool:
    """Whether `encoder` can code frames asked in `pix_fmt`."""
    return pix_fmt in ENCODER_INPUTS.get(encoder, PIXEL_FORMATS)


def choose_encoder(
    codec: str,
    pix_fmt: str,
    size: tuple[int, int],
    available: Collection[str],
    nvenc_works: Callable[[str, str], bool],
    allow_nvenc: bool = True,
) -> str:
    """The ffmpeg encoder for `codec` in `pix_fmt` at `size` (width, height): its NVENC encoder when
    allowed, listed in `available`, able to take that pixel format and size, and `nvenc_works(encoder,
    pix_fmt)` (asked only then); else the first CPU encoder listed that takes the pixel format.
    RestoreError INTERNAL when ffmpeg has none."""
    spec = _codec(codec)
    nvenc = spec.nvenc_encoder
    if (
        allow_nvenc
        and nvenc is not None
        and nvenc in available
        and _nvenc_takes(nvenc, pix_fmt, size)
        and nvenc_works(nvenc, pix_fmt)
    ):
        return nvenc
    for encoder in spec.cpu_encoders:
        if encoder in available and encoder_takes(encoder, pix_fmt):
            return encoder
    candidates = ", ".join(encoder for encoder in spec.cpu_encoders if encoder_takes(encoder, pix_fmt))
    raise RestoreError(INTERNAL, f"this worker's ffmpeg has no {codec} encoder for {pix_fmt} ({candidates})")


def encoder_pix_fmt(encoder: str, pix_fmt: str) -> str:
    """The pixel format the encoder is fed for the asked format `pix_fmt`."""
    return ENCODER_INPUTS.get(encoder, {}).get(pix_fmt, pix_fmt)


def encoder_options(encoder: str, crf: int | None, pix_fmt: str) -> list[str]:
    """`-c:v`, the quality options of `encoder` (at `crf` for the encoders with a crf scale), then `-pix_fmt`."""
    fed = encoder_pix_fmt(encoder, pix_fmt)
    if encoder == "prores_ks":
        quality = ["-profile:v", PRORES_PROFILES[fed], "-vendor", PRORES_VENDOR]
    elif encoder == "ffv1":
        quality = list(FFV1_OPTIONS)
    else:
        assert crf is not None, f"{encoder} encodes at a crf; resolve_crf gives the codec's default"
        quality = _crf_options(encoder, crf)
        if encoder in NVENC_444_PROFILES and EVEN_SIDES[pix_fmt] == (False, False):  # 4:4:4
            quality += ["-profile:v", NVENC_444_PROFILES[encoder]]
    return ["-c:v", encoder, *quality, "-pix_fmt", fed]


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


def _crf_options(encoder: str, crf: int) -> list[str]:
    """The constant-quality options of an encoder with a crf scale."""
    if encoder.endswith("_nvenc"):
        # cq 0 means "let NVENC choose"; 1 is its finest step. -b:v 0 lifts the default bitrate cap.
        return ["-rc", "vbr", "-cq", str(max(crf, 1)), "-b:v", "0", "-preset", NVENC_PRESET, "-tune", "hq"]
    return {
        "libx264": ["-crf", str(crf)],
        "libx265": ["-crf", str(crf), "-x265-params", "log-level=error"],
        # -b:v 0 makes -crf constant quality instead of a bitrate-capped one.
        "libvpx-vp9": ["-crf", str(crf), "-b:v", "0", "-deadline", "good", "-cpu-used", str(VP9_CPU_USED),
                       "-row-mt", "1"],
        # ffmpeg ignores crf 0 for SVT-AV1 (it means "unset").
        "libsvtav1": ["-crf", str(max(crf, 1)), "-preset", str(SVT_AV1_PRESET)],
        "libaom-av1": ["-crf", str(crf), "-b:v", "0", "-cpu-used", str(AOM_CPU_USED), "-row-mt", "1"],
    }[encoder]


def _nvenc_takes(encoder: str, pix_fmt: str, size: tuple[int, int]) -> bool:
    """NVENC's pixel formats and frame sides; a side the writer does not pad (4:4:4) must be even."""
    padded = EVEN_SIDES[pix_fmt]
    return encoder_takes(encoder, pix_fmt) and all(
        NVENC_MIN_SIDE <= side <= NVENC_MAX_SIDE[encoder] and (side % 2 == 0 or even)
        for side, even in zip(size, padded)
    )


def _codec(codec: str) -> Codec:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    return CODECS[codec]


def _pix_fmt(pix_fmt: str) -> str:
    if pix_fmt not in PIXEL_FORMATS:
        raise ValueError(f"pix_fmt must be one of {sorted(PIXEL_FORMATS)}, got {pix_fmt!r}")
    return pix_fmt
