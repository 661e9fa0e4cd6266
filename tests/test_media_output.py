"""Output formats: video codecs x containers x pixel formats, audio per container,
crf, the NVENC choice, image quality, and the before/after picture.

What each combination must give is written down here from the formats' own rules
(container specs, ffmpeg's codec names, BT.709 limited-range levels), not read
back from seedvr.io.media.encoders' tables.
"""

import logging
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_factory import (
    FFMPEG,
    HEIGHT,
    WIDTH,
    base_alpha,
    closest_pattern_frame,
    ffmpeg_children,
    pattern_frames,
    stream_line,
    write_video,
)

from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.media import encoders
from seedvr.io.media.compare import side_by_side
from seedvr.io.media.encoders import (
    available_encoders,
    choose_encoder,
    container_extension,
    container_for,
    container_mime,
    crf_range,
    default_crf,
    encoder_options,
    nvenc_works,
    resolve_crf,
    video_encoder,
)
from seedvr.io.media.ffmpeg import packet_timing
from seedvr.io.media.image import image_extension, image_mime, read_image, write_image
from seedvr.io.media.payload import sniff_media
from seedvr.io.media.video import iter_frames, probe_video
from seedvr.io.media.writer import VideoWriter

PATTERN_TOLERANCE = 8.0  # largest mean-colour error of a frame after lossy codecs
FPS = Fraction(24000, 1001)
FRAME_COUNT = 6
STORED_NAMES = {"h264": "h264", "h265": "hevc", "vp9": "vp9", "av1": "av1"}  # as ffmpeg names the streams
MIMES = {"mp4": "video/mp4", "webm": "video/webm", "mkv": "video/x-matroska"}
# WebM (webmproject.org) allows VP8/VP9/AV1 only; MP4 and Matroska hold all four.
ALLOWED = [("mp4", c) for c in STORED_NAMES] + [("webm", "vp9"), ("webm", "av1")] + [("mkv", c) for c in STORED_NAMES]
FORBIDDEN = [("webm", "h264"), ("webm", "h265")]
PIXEL_FORMATS = ["yuv420p", "yuv420p10le"]
# BT.709 limited range: Y runs from 16 to 235 (8-bit), 64 to 940 (10-bit).
LUMA_LEVELS = {"yuv420p": (16, 235), "yuv420p10le": (64, 940)}
AUDIO_PACKET_SLACK_S = 0.05


def write_clip(path: Path, frames: np.ndarray, **options) -> VideoWriter:
    with VideoWriter(path, frames.shape[2], frames.shape[1], options.pop("fps", FPS), **options) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


def audio_md5(path: Path) -> str:
    command = [FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a", "-c", "copy", "-f", "md5", "-"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def textured_frames(count: int, seed: int = 0) -> np.ndarray:
    """Detailed frames (noise over a gradient): their encoded size follows the quality setting."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1)
    return np.stack([np.clip(base + rng.integers(-40, 40, base.shape), 0, 255) for _ in range(count)]).astype(np.uint8)


# ----------------------------------------------------------------------------- codecs x containers x pixel formats

@pytest.mark.parametrize("pix_fmt", PIXEL_FORMATS)
@pytest.mark.parametrize("container, codec", ALLOWED, ids=[f"{c}-{k}" for c, k in ALLOWED])
def test_every_allowed_combination_round_trips(tmp_path, container, codec, pix_fmt):
    path = tmp_path / f"out.{container_extension(container)}"
    writer = write_clip(path, pattern_frames(FRAME_COUNT), codec=codec, pix_fmt=pix_fmt, container=container)
    assert (writer.container, writer.mime) == (container, MIMES[container])
    info = probe_video(path)
    assert (info.codec, info.pix_fmt) == (STORED_NAMES[codec], pix_fmt)
    assert (info.frame_count, info.fps, info.width, info.height) == (FRAME_COUNT, FPS, WIDTH, HEIGHT)
    assert f"{pix_fmt}(tv, bt709, progressive)" in stream_line(path, "Video")
    if (codec, container) == ("h265", "mp4"):
        assert "(hvc1 / " in stream_line(path, "Video")  # Apple players refuse the default hev1
    assert sniff_media(path.read_bytes()).mime == MIMES[container] == container_mime(container)
    for index, frame in enumerate(iter_frames(path, info)):
        closest, distance = closest_pattern_frame(frame, FRAME_COUNT)
        assert closest == index and distance <= PATTERN_TOLERANCE, (index, closest, distance)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert ffmpeg_children() == []


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), Fraction(60000, 1001), Fraction(25, 2), Fraction(15)], ids=str)
@pytest.mark.parametrize("container", ["webm", "mkv"])
def test_matroska_keeps_common_rates_exact(tmp_path, container, fps):
    # Matroska stores millisecond timestamps; 7 frames at 60000/1001 span 117 ms, not 116.78.
    write_clip(tmp_path / f"out.{container}", pattern_frames(7), fps=fps, codec="vp9", container=container)
    info = probe_video(tmp_path / f"out.{container}")
    assert (info.fps, info.frame_count) == (fps, 7)


@pytest.mark.parametrize("codec", STORED_NAMES)
@pytest.mark.parametrize("pix_fmt", PIXEL_FORMATS)
def test_luma_uses_the_limited_range_levels_of_the_bit_depth(tmp_path, codec, pix_fmt):
    # Black then white: a 10-bit file that held 8-bit values would show 16/235 instead of 64/940.
    frames = np.stack([np.zeros((HEIGHT, WIDTH, 3), np.uint8), np.full((HEIGHT, WIDTH, 3), 255, np.uint8)])
    path = tmp_path / "levels.mkv"
    write_clip(path, frames, codec=codec, pix_fmt=pix_fmt, container="mkv")
    command = [FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    samples = np.frombuffer(raw, np.uint16 if pix_fmt.endswith("10le") else np.uint8)
    luma = samples.reshape(2, -1)[:, : WIDTH * HEIGHT].astype(int)  # planar: Y comes first
    black, white = LUMA_LEVELS[pix_fmt]
    step = 4 if pix_fmt.endswith("10le") else 1
    assert np.abs(luma[0] - black).max() <= 2 * step and np.abs(luma[1] - white).max() <= 2 * step


def test_ten_bit_pads_odd_sizes(tmp_path):
    frames = pattern_frames(4, WIDTH - 1, HEIGHT - 1)
    write_clip(tmp_path / "odd.mp4", frames, codec="av1", pix_fmt="yuv420p10le")
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.frame_count, info.pix_fmt) == (WIDTH, HEIGHT, 4, "yuv420p10le")


@pytest.mark.parametrize("container, codec", FORBIDDEN + [("avi", "h264"), ("mp4", "mpeg2")], ids=str)
def test_forbidden_combinations_raise_before_starting_ffmpeg(tmp_path, container, codec):
    with pytest.raises(ValueError) as caught:
        VideoWriter(tmp_path / "out", WIDTH, HEIGHT, FPS, codec=codec, container=container)
    assert (container if codec != "mpeg2" else codec) in str(caught.value)
    assert list(tmp_path.iterdir()) == [] and ffmpeg_children() == []


@pytest.mark.parametrize("container, codec", FORBIDDEN, ids=str)
def test_container_for_names_the_containers_that_would_work(container, codec):
    with pytest.raises(ValueError) as caught:
        container_for(codec, container)
    assert codec in str(caught.value) and "mp4" in str(caught.value) and "mkv" in str(caught.value)


def test_container_defaults_and_file_facts():
    assert [container_for(c) for c in ("h264", "h265", "vp9", "av1")] == ["mp4", "mp4", "webm", "mp4"]
    assert [container_for("vp9", c) for c in ("mp4", "webm", "mkv")] == ["mp4", "webm", "mkv"]
    assert [container_extension(c) for c in ("mp4", "webm", "mkv")] == ["mp4", "webm", "mkv"]


def test_writer_defaults_to_h264_crf_18_in_mp4(tmp_path):
    writer = write_clip(tmp_path / "out.mp4", pattern_frames(3))
    assert (writer.codec, writer.crf, writer.container, writer.pix_fmt) == ("h264", 18, "mp4", "yuv420p")
    assert probe_video(tmp_path / "out.mp4").codec == "h264"


def test_av1_falls_back_to_libaom_when_svt_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(encoders, "available_encoders", lambda: frozenset({"libaom-av1", "libx264"}))
    writer = write_clip(tmp_path / "out.webm", pattern_frames(FRAME_COUNT), codec="av1", pix_fmt="yuv420p10le")
    assert writer.encoder == "libaom-av1"
    info = probe_video(tmp_path / "out.webm")
    assert (info.codec, info.pix_fmt, info.frame_count, info.fps) == ("av1", "yuv420p10le", FRAME_COUNT, FPS)
    assert [closest_pattern_frame(f, FRAME_COUNT)[0] for f in iter_frames(tmp_path / "out.webm", info)] == list(
        range(FRAME_COUNT))


# ----------------------------------------------------------------------------- crf

def test_crf_ranges_and_defaults():
    assert [crf_range(c) for c in ("h264", "h265", "vp9", "av1")] == [(0, 51), (0, 51), (0, 63), (0, 63)]
    assert [default_crf(c) for c in ("h264", "h265", "vp9", "av1")] == [18, 20, 30, 30]
    assert resolve_crf("h265", None) == 20 and resolve_crf("vp9", 63) == 63 and resolve_crf("h264", 0) == 0


@pytest.mark.parametrize("codec, crf", [("h264", 52), ("h265", -1), ("vp9", 64), ("av1", 100), ("h264", 20.5),
                                        ("h264", True), ("h264", "20")])
def test_crf_outside_the_codec_range_raises(tmp_path, codec, crf):
    with pytest.raises(ValueError):
        resolve_crf(codec, crf)
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "out.mkv", WIDTH, HEIGHT, FPS, codec=codec, crf=crf, container="mkv")
    assert ffmpeg_children() == []


@pytest.mark.parametrize("codec, fine, coarse", [("h264", 12, 40), ("h265", 12, 40), ("vp9", 12, 55), ("av1", 12, 55)])
def test_lower_crf_gives_a_larger_file(tmp_path, codec, fine, coarse):
    frames = textured_frames(6)
    sizes = []
    for crf in (fine, coarse):
        path = tmp_path / f"{crf}.mkv"
        write_clip(path, frames, codec=codec, crf=crf, container="mkv")
        sizes.append(path.stat().st_size)
    assert sizes[0] > 1.5 * sizes[1], sizes


# ----------------------------------------------------------------------------- audio per container

def audio_source(tmp_path: Path, audio_args: tuple[str, ...], seconds: float = 0.4) -> Path:
    """8 frames at 25 fps with a tone in the codec `audio_args` asks for; DVD PCM only fits in a VOB."""
    if "pcm_dvd" in audio_args:
        return write_video(tmp_path / "source.vob", pattern_frames(8), Fraction(25),
                           ("-c:v", "mpeg2video", "-f", "vob"), audio_args, seconds)
    return write_video(tmp_path / "source.mkv", pattern_frames(8), Fraction(25), audio_args=audio_args,
                       audio_seconds=seconds)


@pytest.mark.parametrize(
    "container, codec, source_audio, expected, copied",
    [
        ("webm", "vp9", "aac", "opus", False),
        ("webm", "av1", "pcm_s16le", "opus", False),
        ("webm", "vp9", "libopus", "opus", True),
        ("webm", "vp9", "libvorbis", "vorbis", True),
        ("mkv", "h264", "pcm_s16le", "pcm_s16le", True),
        ("mkv", "h265", "aac", "aac", True),
        ("mkv", "av1", "mp2", "mp2", True),
        ("mkv", "h264", "pcm_dvd", "flac", False),  # Matroska has no id for DVD PCM: lossless FLAC
        ("mp4", "av1", "libopus", "aac", False),  # many players stay silent on Opus in mp4
        ("mp4", "h265", "pcm_s16le", "aac", False),
    ],
    ids=lambda value: str(value),
)
def test_audio_is_copied_or_re_encoded_as_the_container_allows(tmp_path, container, codec, source_audio, expected,
                                                               copied):
    source = audio_source(tmp_path, ("-c:a", source_audio), seconds=3.0)  # longer than the video: kept whole
    info = probe_video(source)
    out = tmp_path / f"out.{container_extension(container)}"
    write_clip(out, pattern_frames(info.frame_count), fps=info.fps, codec=codec, container=container,
               audio_source=source)
    written = probe_video(out)
    assert (written.audio_codec, written.frame_count, written.codec) == (expected, 8, STORED_NAMES[codec])
    assert abs(float(packet_timing(out, 1).span) - 3.0) <= AUDIO_PACKET_SLACK_S
    if (container, codec) == ("mp4", "h265"):
        assert "(hvc1 / " in stream_line(out, "Video")  # the tag is written with the audio
    if copied:
        assert audio_md5(out) == audio_md5(source)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == [out.name]


def test_failing_audio_in_webm_leaves_no_file(tmp_path, caplog):
    not_media = tmp_path / "audio.mkv"
    not_media.write_bytes(b"\x1aE\xdf\xa3" + bytes(300))
    with caplog.at_level(logging.ERROR), pytest.raises(RestoreError) as caught:
        write_clip(tmp_path / "out.webm", pattern_frames(3), codec="vp9", audio_source=not_media)
    assert caught.value.code == INTERNAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.mkv"]
    assert ffmpeg_children() == []


# ----------------------------------------------------------------------------- NVENC choice

ALL_CPU = {"libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1"}
ALL_NVENC = {"h264_nvenc", "hevc_nvenc", "av1_nvenc"}


class Trial:
    """A stand-in for the one-frame trial encode that records what it was asked."""

    def __init__(self, works: bool):
        self.works, self.asked = works, []

    def __call__(self, encoder: str, pix_fmt: str) -> bool:
        self.asked.append((encoder, pix_fmt))
        return self.works


@pytest.mark.parametrize(
    "codec, available, works, allow, expected, trial",
    [
        ("h264", ALL_CPU | ALL_NVENC, True, True, "h264_nvenc", "h264_nvenc"),
        ("h265", ALL_CPU | ALL_NVENC, True, True, "hevc_nvenc", "hevc_nvenc"),
        ("av1", ALL_CPU | ALL_NVENC, True, True, "av1_nvenc", "av1_nvenc"),
        ("h264", ALL_CPU | ALL_NVENC, False, True, "libx264", "h264_nvenc"),  # listed, but the GPU has no NVENC
        ("av1", ALL_CPU | ALL_NVENC, False, True, "libsvtav1", "av1_nvenc"),
        ("h265", ALL_CPU, True, True, "libx265", None),  # not listed: no trial
        ("h264", ALL_CPU | ALL_NVENC, True, False, "libx264", None),  # SEEDVR_DISABLE_NVENC
        ("vp9", ALL_CPU | ALL_NVENC, True, True, "libvpx-vp9", None),  # NVENC has no VP9
        ("av1", ALL_CPU - {"libsvtav1"}, True, True, "libaom-av1", None),
    ],
)
def test_choose_encoder(codec, available, works, allow, expected, trial):
    recorder = Trial(works)
    assert choose_encoder(codec, "yuv420p10le", (1920, 1080), available, recorder, allow) == expected
    assert recorder.asked == ([(trial, "yuv420p10le")] if trial else [])


@pytest.mark.parametrize(
    "codec, size, expected",
    [
        ("h264", (4096, 2160), "h264_nvenc"),
        ("h264", (5120, 2880), "libx264"),  # H.264 NVENC stops at 4096
        ("h265", (7680, 4320), "hevc_nvenc"),
        ("av1", (8192, 4320), "av1_nvenc"),
        ("av1", (8200, 4320), "libsvtav1"),
        ("h265", (1920, 128), "libx265"),  # below NVENC's smallest frames
        ("h264", (160, 160), "h264_nvenc"),
    ],
)
def test_choose_encoder_keeps_nvenc_within_its_frame_sizes(codec, size, expected):
    assert choose_encoder(codec, "yuv420p", size, ALL_CPU | ALL_NVENC, Trial(True)) == expected


def test_choose_encoder_without_any_encoder_is_internal():
    with pytest.raises(RestoreError) as caught:
        choose_encoder("h265", "yuv420p", (640, 480), {"libx264"}, Trial(True))
    assert caught.value.code == INTERNAL and "h265" in caught.value.message


@pytest.mark.parametrize("value, expected", [("1", "libx264"), ("true", "libx264"), ("", "h264_nvenc"),
                                             ("0", "h264_nvenc")])
def test_disable_nvenc_env(monkeypatch, value, expected):
    monkeypatch.setattr(encoders, "available_encoders", lambda: frozenset(ALL_CPU | ALL_NVENC))
    monkeypatch.setattr(encoders, "nvenc_works", Trial(True))
    monkeypatch.setenv("SEEDVR_DISABLE_NVENC", value)
    assert video_encoder("h264", "yuv420p", (1280, 720)) == expected


def test_nvenc_options_are_constant_quality_on_the_crf_scale():
    options = encoder_options("hevc_nvenc", 24, "yuv420p10le")
    pairs = dict(zip(options[::2], options[1::2]))
    assert pairs["-c:v"] == "hevc_nvenc" and pairs["-rc"] == "vbr" and pairs["-cq"] == "24"
    assert pairs["-b:v"] == "0"  # no bitrate cap on top of the quality target
    assert pairs["-pix_fmt"] == "p010le"  # NVENC's 10-bit input
    assert dict(zip(*[iter(encoder_options("av1_nvenc", 0, "yuv420p"))] * 2))["-cq"] == "1"  # cq 0 = "auto"


def test_the_bundled_ffmpeg_lists_the_preferred_encoders():
    assert {"libx264", "libx265", "libvpx-vp9", "libsvtav1", "h264_nvenc", "hevc_nvenc"} <= available_encoders()


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="an NVIDIA driver is present")
def test_nvenc_trial_fails_without_a_gpu():
    nvenc_works.cache_clear()
    assert nvenc_works("h264_nvenc", "yuv420p") is False
    assert video_encoder("h264", "yuv420p", (1280, 720)) == "libx264"


# ----------------------------------------------------------------------------- images

def test_image_mime_and_extension_match_the_written_bytes(tmp_path):
    for fmt, mime, extension in [("png", "image/png", "png"), ("jpeg", "image/jpeg", "jpg"),
                                 ("webp", "image/webp", "webp")]:
        path = tmp_path / f"out.{image_extension(fmt)}"
        write_image(textured_frames(1)[0], None, path, format=fmt)
        assert (image_mime(fmt), image_extension(fmt)) == (mime, extension)
        assert sniff_media(path.read_bytes()).mime == mime


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_image_quality_trades_size_for_error(tmp_path, fmt):
    rgb = textured_frames(1)[0]
    sizes, errors = [], []
    for quality in (30, 90):
        path = tmp_path / f"{quality}.{fmt}"
        write_image(rgb, None, path, format=fmt, quality=quality)
        sizes.append(path.stat().st_size)
        errors.append(np.abs(read_image(path).rgb.astype(int) - rgb).mean())
    assert sizes[0] < sizes[1] and errors[0] > errors[1] > 0, (sizes, errors)


def test_webp_at_quality_100_is_lossless_with_alpha(tmp_path):
    rgb, alpha = textured_frames(1)[0], base_alpha()
    write_image(rgb, alpha, tmp_path / "out.webp", format="webp", quality=100)
    decoded = read_image(tmp_path / "out.webp")
    np.testing.assert_array_equal(decoded.rgb, rgb)
    np.testing.assert_array_equal(decoded.alpha, alpha)


@pytest.mark.parametrize("quality", [0, 101, 50.5, True])
def test_image_quality_out_of_range_raises(tmp_path, quality):
    with pytest.raises(ValueError):
        write_image(textured_frames(1)[0], None, tmp_path / "out.jpg", format="jpeg", quality=quality)


# ----------------------------------------------------------------------------- side by side

def smooth(width: int, height: int) -> np.ndarray:
    """The same smooth picture at any size: colours depend on the relative position only."""
    y, x = np.mgrid[0:height, 0:width]
    u, v = (x + 0.5) / width, (y + 0.5) / height
    return np.rint(np.stack([200 * u + 20, 180 * v + 30, 100 * (u + v) + 20], axis=-1)).astype(np.uint8)


def test_side_by_side_geometry_and_content():
    before, after = smooth(32, 24), textured_frames(1)[0]  # the output is twice the input size
    picture = side_by_side(before, after, gap=3, labels=False)
    assert picture.dtype == np.uint8 and picture.shape == (HEIGHT, 2 * WIDTH + 3, 3)
    np.testing.assert_array_equal(picture[:, WIDTH + 3:], after)
    left = picture[:, :WIDTH].astype(int)
    # Away from the border Lanczos upscaling of a linear ramp is the ramp at the larger size.
    assert np.abs(left[4:-4, 4:-4] - smooth(WIDTH, HEIGHT)[4:-4, 4:-4]).max() <= 2
    separator = picture[:, WIDTH:WIDTH + 3]
    assert (separator == separator[0, 0]).all() and separator.min() > 200  # light, so it stands out


def test_side_by_side_labels_stay_in_the_top_left_corners():
    before, after = smooth(160, 120), smooth(320, 240)
    plain = side_by_side(before, after, gap=4, labels=False)
    labelled = side_by_side(before, after, gap=4, labels=True)
    assert labelled.shape == plain.shape == (240, 644, 3)
    changed = np.argwhere(np.abs(labelled.astype(int) - plain).max(axis=2) > 0)
    assert changed.size > 0
    for left in (0, 324):  # each half has its own label
        inside = changed[(changed[:, 1] >= left) & (changed[:, 1] < left + 320)]
        assert inside.size > 0 and inside[:, 0].max() < 240 // 4 and inside[:, 1].max() < left + 320 // 2
    tiny = side_by_side(smooth(8, 6), smooth(16, 12), gap=2)  # too small to hold a label: none drawn
    np.testing.assert_array_equal(tiny, side_by_side(smooth(8, 6), smooth(16, 12), gap=2, labels=False))


@pytest.mark.parametrize("before, after", [(np.zeros((4, 4), np.uint8), np.zeros((8, 8, 3), np.uint8)),
                                           (np.zeros((4, 4, 3), np.float32), np.zeros((8, 8, 3), np.uint8)),
                                           (np.zeros((4, 4, 3), np.uint8), np.zeros((0, 8, 3), np.uint8))])
def test_side_by_side_rejects_bad_arrays(before, after):
    with pytest.raises(ValueError):
        side_by_side(before, after)
