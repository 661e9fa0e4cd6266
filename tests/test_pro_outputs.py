"""Outputs for professionals: 4:4:4 pixel formats, ProRes (422 HQ and 4444), lossless FFV1, the mov container,
and which audio each container keeps.

What each case must give is written down here from the formats' own rules (ProRes profiles and their
sample entries, chroma subsampling, what QuickTime and mp4 players read), not read back from
seedvr.io.media.encoders' tables.
"""

import base64
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_factory import (
    FFMPEG,
    HEIGHT,
    WIDTH,
    closest_pattern_frame,
    ffmpeg_children,
    pattern_frames,
    stream_line,
    write_video,
)

from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.io.media.encoders import (
    audio_codec_args,
    available_encoders,
    choose_encoder,
    container_for,
    crf_range,
    encoder_options,
    even_sides,
    frame_padding,
    resolve_crf,
    stored_pix_fmt,
    video_tag,
)
from seedvr.io.media.payload import sniff_media
from seedvr.io.media.video import iter_frames, probe_video
from seedvr.io.media.writer import VideoWriter
from seedvr.serving.schema import parse_request

FPS = Fraction(25)
FRAME_COUNT = 5
PATTERN_TOLERANCE = 8.0  # largest mean-colour error of a frame after lossy codecs
MIMES = {"mp4": "video/mp4", "mov": "video/quicktime", "mkv": "video/x-matroska", "webm": "video/webm"}
FULL_CHROMA_ERROR = 8.0  # mean error allowed on 1-pixel colour stripes kept at full chroma resolution (lossy codecs)
HALVED_CHROMA_ERROR = 40.0  # 4:2:0 averages each red/blue pair: the stripes come back as one purple (measured ~57)


def write_clip(path: Path, frames: np.ndarray, **options) -> VideoWriter:
    with VideoWriter(path, frames.shape[2], frames.shape[1], options.pop("fps", FPS), **options) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


def colour_stripes(count: int) -> np.ndarray:
    """1-pixel columns alternating red and blue (shifting by one column per frame): only a format that keeps a
    chroma sample per pixel can hold them. Rows are all alike, so nothing here looks interlaced."""
    columns = (np.arange(WIDTH)[None, :] + np.arange(count)[:, None]) % 2  # (frames, width)
    colours = np.array([[200, 40, 40], [40, 40, 200]], dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours[columns][:, None], (count, HEIGHT, WIDTH, 3)))


def decoded(path: Path) -> np.ndarray:
    return np.stack(list(iter_frames(path, probe_video(path))))


def packet_hashes(path: Path, kind: str = "a") -> list[str]:
    """"size,md5" of each packet of the first stream of `kind` ("a", "v"), in order (side data left out)."""
    command = [FFMPEG, "-v", "error", "-i", str(path), "-map", f"0:{kind}:0", "-c", "copy", "-f", "framemd5", "-"]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    # stream, dts, pts, duration, size, md5[, side data]
    return [",".join(part.strip() for part in line.split(",")[4:6]) for line in lines if not line.startswith("#")]


# ----------------------------------------------------------------------------- pixel formats and codecs

# codec, pix_fmt asked, container (None: the codec's default), container written, stream codec and pixel format as
# ffmpeg reads them back, the encoder's profile as ffmpeg prints it (None: not checked)
PRO_CASES = [
    ("h264", "yuv444p", None, "mp4", "h264", "yuv444p", "High 4:4:4 Predictive"),
    ("h264", "yuv444p10le", "mkv", "mkv", "h264", "yuv444p10le", "High 4:4:4 Predictive"),
    ("h265", "yuv444p", "mov", "mov", "hevc", "yuv444p", "Rext"),
    ("h265", "yuv444p10le", None, "mp4", "hevc", "yuv444p10le", "Rext"),
    ("vp9", "yuv444p", None, "webm", "vp9", "yuv444p", "Profile 1"),
    ("vp9", "yuv444p10le", "mkv", "mkv", "vp9", "yuv444p10le", "Profile 3"),
    ("av1", "yuv444p", "webm", "webm", "av1", "yuv444p", None),  # High profile; SVT-AV1 has no 4:4:4
    ("av1", "yuv444p10le", None, "mp4", "av1", "yuv444p10le", None),
    # ProRes 422 HQ (sample entry apch) for the 4:2:0 requests: never less chroma or fewer bits than asked.
    ("prores", "yuv420p", None, "mov", "prores", "yuv422p10le", "HQ"),
    ("prores", "yuv420p10le", "mkv", "mkv", "prores", "yuv422p10le", "HQ"),
    # ProRes 4444 (ap4h) holds up to 12 bits: ffmpeg decodes it as yuv444p12le.
    ("prores", "yuv444p", None, "mov", "prores", "yuv444p12le", "4444"),
    ("prores", "yuv444p10le", None, "mov", "prores", "yuv444p12le", "4444"),
    ("ffv1", "yuv420p", None, "mkv", "ffv1", "yuv420p", None),
    ("ffv1", "yuv444p10le", "mkv", "mkv", "ffv1", "yuv444p10le", None),
]
PRORES_SAMPLE_ENTRIES = {"HQ": "apch", "4444": "ap4h"}  # Apple's four-character codes of the two profiles


@pytest.mark.parametrize("codec, pix_fmt, asked, container, stored_codec, stored_pix_fmt, profile", PRO_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in PRO_CASES])
def test_pro_formats_decode_with_their_pixel_format_and_every_frame(tmp_path, codec, pix_fmt, asked, container,
                                                                    stored_codec, stored_pix_fmt, profile):
    path = tmp_path / f"out.{container}"
    writer = write_clip(path, pattern_frames(FRAME_COUNT), codec=codec, pix_fmt=pix_fmt, container=asked)
    assert (writer.container, writer.mime) == (container, MIMES[container])
    info = probe_video(path)
    assert (info.codec, info.pix_fmt, info.frame_count, info.fps) == (stored_codec, stored_pix_fmt, FRAME_COUNT, FPS)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    line = stream_line(path, "Video")
    if profile:
        assert f"({profile})" in line, line
    if codec == "prores":
        assert f"({PRORES_SAMPLE_ENTRIES[profile]} / " in line, line
    assert sniff_media(path.read_bytes()).mime == MIMES[container]
    for index, frame in enumerate(iter_frames(path, info)):
        closest, distance = closest_pattern_frame(frame, FRAME_COUNT)
        assert closest == index and distance <= PATTERN_TOLERANCE, (index, closest, distance)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert ffmpeg_children() == []


@pytest.mark.parametrize("codec, container", [("h264", "mkv"), ("h265", "mkv"), ("vp9", "webm"), ("av1", "mkv"),
                                              ("prores", "mov")])
@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv444p10le"])
def test_full_chroma_formats_keep_one_colour_per_pixel(tmp_path, codec, container, pix_fmt):
    stripes = colour_stripes(3)
    write_clip(tmp_path / f"out.{container}", stripes, codec=codec, pix_fmt=pix_fmt, container=container)
    error = np.abs(decoded(tmp_path / f"out.{container}").astype(int) - stripes).mean()
    assert error < FULL_CHROMA_ERROR, error


def test_halved_chroma_loses_the_stripes_so_the_test_above_can_fail(tmp_path):
    stripes = colour_stripes(3)
    write_clip(tmp_path / "out.mkv", stripes, codec="h264", pix_fmt="yuv420p", container="mkv")
    assert np.abs(decoded(tmp_path / "out.mkv").astype(int) - stripes).mean() > HALVED_CHROMA_ERROR


def test_ffv1_in_yuv444p10le_gives_back_the_exact_rgb_frames(tmp_path):
    # 8-bit RGB -> 10-bit 4:4:4 -> 8-bit RGB rounds back to the same values; FFV1 itself loses nothing.
    frames = np.random.default_rng(0).integers(0, 256, (3, HEIGHT - 1, WIDTH - 1, 3), dtype=np.uint8)
    write_clip(tmp_path / "out.mkv", frames, codec="ffv1", pix_fmt="yuv444p10le")
    np.testing.assert_array_equal(decoded(tmp_path / "out.mkv"), frames)  # odd sizes too: nothing padded


def test_ffv1_frames_are_all_keyframes_and_their_slices_carry_crcs(tmp_path):
    path = tmp_path / "out.mkv"
    write_clip(path, pattern_frames(3), codec="ffv1")
    keyframes = [FFMPEG, "-v", "error", "-skip_frame", "nokey", "-i", str(path), "-f", "framemd5", "-"]
    decoded_keyframes = subprocess.run(keyframes, capture_output=True, text=True, check=True).stdout
    assert len([line for line in decoded_keyframes.splitlines() if not line.startswith("#")]) == 3  # -g 1
    # Flip one byte inside the last frame's data: version 3's slice CRCs report it (version 1 decodes silently).
    packets = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-c", "copy", "-f", "rawvideo", "-"],
                             capture_output=True, check=True).stdout
    last_size = int(packet_hashes(path, "v")[-1].split(",")[0])
    data = bytearray(path.read_bytes())
    where = data.rfind(packets[-last_size:]) + last_size // 2
    assert where > last_size // 2
    data[where] ^= 0x55
    path.write_bytes(data)
    damaged = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    assert "slice CRC mismatch" in damaged.stderr, damaged.stderr


# ----------------------------------------------------------------------------- sides, padding and encoders

@pytest.mark.parametrize(
    "codec, pix_fmt, padding",
    [
        ("h264", "yuv420p", (1, 1)),  # 4:2:0: both sides even
        ("av1", "yuv420p10le", (1, 1)),
        ("h264", "yuv444p", (0, 0)),  # 4:4:4: any size
        ("h265", "yuv444p10le", (0, 0)),
        ("prores", "yuv420p", (0, 0)),  # ProRes and FFV1 code odd sizes as they are
        ("prores", "yuv444p", (0, 0)),
        ("ffv1", "yuv420p", (0, 0)),
    ],
)
def test_frame_padding_follows_the_chroma_layout(codec, pix_fmt, padding):
    assert frame_padding(codec, pix_fmt, WIDTH - 1, HEIGHT - 1) == padding
    assert frame_padding(codec, pix_fmt, WIDTH, HEIGHT) == (0, 0)


def test_stored_pixel_formats_and_even_sides():
    assert [stored_pix_fmt("prores", p) for p in ("yuv420p", "yuv420p10le", "yuv444p", "yuv444p10le")] == [
        "yuv422p10le", "yuv422p10le", "yuv444p10le", "yuv444p10le"]
    assert stored_pix_fmt("h265", "yuv444p10le") == "yuv444p10le"
    assert even_sides("h264", "yuv420p") == (True, True) and even_sides("vp9", "yuv444p") == (False, False)
    with pytest.raises(ValueError, match="pix_fmt must be one of"):
        stored_pix_fmt("h264", "yuv422p10le")


def test_odd_sized_full_chroma_is_written_without_padding(tmp_path):
    write_clip(tmp_path / "odd.mp4", pattern_frames(3, WIDTH - 1, HEIGHT - 1), codec="h264", pix_fmt="yuv444p")
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.pix_fmt, info.frame_count) == (WIDTH - 1, HEIGHT - 1, "yuv444p", 3)


class Trial:
    """A stand-in for the one-frame NVENC trial encode that records what it was asked."""

    def __init__(self, works: bool = True):
        self.works, self.asked = works, []

    def __call__(self, encoder: str, pix_fmt: str) -> bool:
        self.asked.append((encoder, pix_fmt))
        return self.works


EVERY_ENCODER = {"libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1", "prores_ks", "ffv1",
                 "h264_nvenc", "hevc_nvenc", "av1_nvenc"}


@pytest.mark.parametrize(
    "codec, pix_fmt, size, expected, trial",
    [
        ("h264", "yuv444p", (1920, 1080), "h264_nvenc", True),  # High 4:4:4 Predictive, 8-bit
        ("h264", "yuv444p10le", (1920, 1080), "libx264", False),  # 10-bit 4:4:4 H.264: not on NVENC
        ("h265", "yuv444p", (1920, 1080), "hevc_nvenc", True),
        ("h265", "yuv444p10le", (1920, 1080), "hevc_nvenc", True),
        ("av1", "yuv444p", (1920, 1080), "libaom-av1", False),  # NVENC's AV1 and SVT-AV1 are 4:2:0 only
        ("av1", "yuv420p", (1920, 1080), "av1_nvenc", True),
        ("h265", "yuv444p", (1921, 1080), "libx265", False),  # an odd 4:4:4 side stays on the CPU
        ("h265", "yuv420p", (1921, 1080), "hevc_nvenc", True),  # 4:2:0 is padded to even first
        ("prores", "yuv444p10le", (1920, 1080), "prores_ks", False),
        ("ffv1", "yuv420p", (1920, 1080), "ffv1", False),
    ],
)
def test_choose_encoder_for_full_chroma_and_pro_codecs(codec, pix_fmt, size, expected, trial):
    recorder = Trial()
    assert choose_encoder(codec, pix_fmt, size, EVERY_ENCODER, recorder) == expected
    assert recorder.asked == ([(expected, pix_fmt)] if trial else [])


def test_choose_encoder_without_a_4_4_4_av1_encoder_is_internal():
    with pytest.raises(RestoreError) as caught:
        choose_encoder("av1", "yuv444p", (640, 480), {"libsvtav1"}, Trial())
    assert caught.value.code == "INTERNAL" and "av1" in caught.value.message and "yuv444p" in caught.value.message


def test_encoder_options_of_the_new_formats():
    def pairs(options: list[str]) -> dict[str, str]:
        return dict(zip(options[::2], options[1::2]))

    assert pairs(encoder_options("h264_nvenc", 20, "yuv444p"))["-profile:v"] == "high444p"
    hevc = pairs(encoder_options("hevc_nvenc", 20, "yuv444p10le"))
    assert (hevc["-profile:v"], hevc["-pix_fmt"]) == ("rext", "yuv444p10msble")  # 10 bits in the high bits
    assert "-profile:v" not in encoder_options("hevc_nvenc", 20, "yuv420p")
    hq, four = pairs(encoder_options("prores_ks", None, "yuv420p")), pairs(encoder_options("prores_ks", None, "yuv444p"))
    assert (hq["-profile:v"], hq["-pix_fmt"], four["-profile:v"], four["-pix_fmt"]) == ("3", "yuv422p10le", "4",
                                                                                          "yuv444p10le")
    assert {"prores_ks", "ffv1", "libaom-av1"} <= available_encoders()  # the bundled ffmpeg has them


# ----------------------------------------------------------------------------- crf and containers

@pytest.mark.parametrize("codec", ["prores", "ffv1"])
def test_codecs_without_a_quality_scale_refuse_a_crf(tmp_path, codec):
    assert crf_range(codec) is None and resolve_crf(codec, None) is None
    with pytest.raises(ValueError, match=f"crf does not apply to {codec}"):
        resolve_crf(codec, 10)
    with pytest.raises(ValueError, match="send crf null"):
        VideoWriter(tmp_path / "out", WIDTH, HEIGHT, FPS, codec=codec, crf=0)
    assert list(tmp_path.iterdir()) == [] and ffmpeg_children() == []


def test_default_containers_and_what_mov_holds():
    assert [container_for(c) for c in ("h264", "h265", "vp9", "av1", "prores", "ffv1")] == [
        "mp4", "mp4", "webm", "mp4", "mov", "mkv"]
    assert [container_for(c, "mov") for c in ("h264", "h265", "prores")] == ["mov"] * 3
    assert container_for("prores", "mkv") == "mkv"
    for codec, container, elsewhere in [("ffv1", "mp4", "mkv"), ("ffv1", "mov", "mkv"), ("prores", "mp4", "mov or mkv"),
                                        ("prores", "webm", "mov or mkv"), ("vp9", "mov", "mp4")]:
        with pytest.raises(ValueError) as caught:
            container_for(codec, container)
        assert f"a {container} file cannot hold {codec}" in str(caught.value)
        assert f"put {codec} in {elsewhere}" in str(caught.value)
    assert (video_tag("h265", "mp4"), video_tag("h265", "mov"), video_tag("h265", "mkv")) == ("hvc1", "hvc1", None)


# ----------------------------------------------------------------------------- schema

def rejection(**fields) -> str:
    with pytest.raises(RestoreError) as caught:
        parse_request({"action": "restore", "media": "aGVsbG8=", **fields})
    assert caught.value.code == INVALID_INPUT
    return caught.value.message


def test_schema_names_the_field_and_the_fix_for_bad_combinations():
    assert rejection(codec="prores", crf=10) == (
        "crf does not apply to prores (its profile sets the quality: 422 HQ, or 4444 for pix_fmt "
        "yuv444p/yuv444p10le): send crf null or leave it out")
    assert rejection(codec="ffv1", crf=0) == "crf does not apply to ffv1 (it is lossless): send crf null or leave it out"
    assert rejection(codec="ffv1", container="mp4") == (
        "container: a mp4 file cannot hold ffv1; use h264 or h265 or vp9 or av1 in mp4, or put ffv1 in mkv")
    assert rejection(codec="prores", container="webm").endswith("or put prores in mov or mkv")
    assert rejection(codec="h264", crf=52) == "crf for h264 must be between 0 and 51, got 52"
    assert rejection(pix_fmt="yuv422p10le").startswith("pix_fmt must be one of 'yuv420p', 'yuv420p10le', 'yuv444p'")


def test_schema_takes_the_new_combinations():
    request = parse_request({"action": "restore", "media": "aGVsbG8=", "codec": "prores"})
    assert (request.codec, request.crf, request.container, request.pix_fmt) == ("prores", None, None, "yuv420p")
    for fields in ({"codec": "ffv1", "pix_fmt": "yuv444p10le"}, {"codec": "h265", "pix_fmt": "yuv444p",
                                                                 "container": "mov", "crf": 12},
                   {"codec": "av1", "pix_fmt": "yuv444p10le"}, {"codec": "prores", "container": "mkv"}):
        parse_request({"action": "restore", "media": "aGVsbG8=", **fields})


# ----------------------------------------------------------------------------- audio per container

AUDIO_RULES = [
    # container, video codec, source audio, audio codec written, copied as is
    ("mp4", "h264", "libopus", "aac", False),  # many players stay silent on Opus in mp4
    ("mp4", "h264", "flac", "aac", False),
    ("mp4", "h265", "ac3", "ac3", True),
    ("mp4", "h264", "eac3", "eac3", True),
    ("mov", "prores", "aac", "aac", True),
    ("mov", "h264", "pcm_s16le", "pcm_s16le", True),
    ("mov", "h265", "libopus", "pcm_s24le", False),  # mov cannot hold Opus: lossless PCM instead
    ("mov", "prores", "flac", "pcm_s24le", False),  # ... nor FLAC
    ("mov", "h264", "mp2", "pcm_s24le", False),  # QuickTime has no MPEG-1 Layer II decoder
    ("mkv", "ffv1", "libopus", "opus", True),
    ("mkv", "ffv1", "wmav2", "flac", False),  # no Matroska codec id for WMA
]


@pytest.mark.parametrize("container, codec, source_audio, written, copied", AUDIO_RULES,
                         ids=[f"{r[0]}-{r[2]}" for r in AUDIO_RULES])
def test_audio_is_copied_or_re_encoded_per_container(tmp_path, container, codec, source_audio, written, copied):
    source = write_video(tmp_path / "source.mkv", pattern_frames(8), FPS, audio_args=("-c:a", source_audio))
    out = tmp_path / f"out.{container}"
    write_clip(out, pattern_frames(8), codec=codec, container=container, audio_source=source)
    info = probe_video(out)
    assert (info.audio_codec, info.frame_count) == (written, 8)
    packets, source_packets = packet_hashes(out), packet_hashes(source)
    if copied:
        assert packets and packets == source_packets[:len(packets)]
    else:
        assert not set(packets) & set(source_packets)


def test_audio_codec_args():
    assert audio_codec_args("mp4", "opus") == ["aac", "-b:a", "192k"]
    assert audio_codec_args("mp4", "ac3") == ["copy"]
    assert audio_codec_args("mov", "pcm_s24be") == ["copy"]
    assert audio_codec_args("mov", "vorbis") == ["pcm_s24le"]
    assert audio_codec_args("mkv", "pcm_dvd") == ["flac"] and audio_codec_args("mkv", "truehd") == ["copy"]
    assert audio_codec_args("webm", "aac") == ["libopus", "-b:a", "160k"]


# ----------------------------------------------------------------------------- through the handler

@pytest.mark.slow
def test_prores_4444_through_the_handler(tiny_handler, tmp_path):
    source = write_video(tmp_path / "in.mp4", pattern_frames(FRAME_COUNT), FPS, audio_args=("-c:a", "aac"))
    media = base64.b64encode(source.read_bytes()).decode()
    answer = tiny_handler({"id": "prores", "input": {"action": "restore", "media": media, "res_h": 32, "res_w": 48,
                                                     "codec": "prores", "pix_fmt": "yuv444p10le",
                                                     "return_data_uri": True}})
    assert "error" not in answer, answer
    prefix = "data:video/quicktime;base64,"
    assert answer["media"][0].startswith(prefix)
    out = tmp_path / "restored.mov"
    out.write_bytes(base64.b64decode(answer["media"][0][len(prefix):]))
    info = probe_video(out)
    assert (info.codec, info.pix_fmt, info.frame_count, info.fps) == ("prores", "yuv444p12le", FRAME_COUNT, FPS)
    assert (info.audio_codec, answer["resolution"]) == ("aac", f"{info.width}x{info.height}")
    assert "(4444) (ap4h / " in stream_line(out, "Video")
