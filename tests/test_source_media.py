"""Footage as it comes from old cameras, DVDs and phones: non-square pixels, variable frame rate, interlaced
fields, colour tags. Clips are made here with the bundled ffmpeg; restores go through the handler's body
(`handler.serve`) on the tiny random-weight installation."""

import base64
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_factory import FFMPEG, closest_pattern_frame, pattern_frames, write_video

from seedvr.errors import RestoreError
from seedvr.io.media.ffmpeg import ColorTags, _pixel_format, list_streams, packet_timing
from seedvr.io.media.hardware_decode import decoder_name, decoder_options, nvdec_works
from seedvr.io.media.video import iter_frames, probe_video, read_frames, select_part
from seedvr.io.media.writer import VideoWriter, output_color


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True)


def restore(tiny_handler, path: Path, tmp_path: Path, **options) -> tuple[dict, Path]:
    answer = tiny_handler({"id": "media", "input": {"action": "restore", "media": base64.b64encode(
        path.read_bytes()).decode(), **options}})
    assert "error" not in answer, answer
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"restored.{options.get('container') or 'mp4'}"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    return answer, out


def display_aspect(path: Path) -> float:
    """Width / height as a player shows it: the stored size times the sample aspect ratio."""
    video = next(s for s in list_streams(path) if s.kind == "video")
    assert video.width is not None and video.height is not None
    return float(video.width * video.sar / video.height)


def idet_counts(path: Path) -> tuple[int, int]:
    """(interlaced, progressive) frames as ffmpeg's idet counts them over the whole file."""
    stderr = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path), "-vf", "idet", "-f", "null", "-"],
                            capture_output=True, text=True, check=True).stderr
    match = re.findall(r"Multi frame detection: TFF:\s*(\d+)\s+BFF:\s*(\d+)\s+Progressive:\s*(\d+)", stderr)[-1]
    return int(match[0]) + int(match[1]), int(match[2])


# ----------------------------------------------------------------------------- pixel aspect

@pytest.mark.parametrize("sar, size", [("32/27", (427, 240)), ("8/9", (360, 270)), ("1/1", (360, 240))],
                         ids=["wide-pixels", "tall-pixels", "square"])
def test_the_reader_resamples_to_square_pixels_at_the_display_aspect(tmp_path, sar, size):
    clip = tmp_path / "sar.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=360x240:rate=25", "-frames:v", "2", "-vf", f"setsar={sar}",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip))
    info = probe_video(clip)
    assert (info.width, info.height) == size
    assert info.sar == Fraction(sar)
    frames = list(iter_frames(clip, info))
    assert [frame.shape for frame in frames] == [(size[1], size[0], 3)] * 2
    assert ("pixel_aspect" in info.describe()) is (sar != "1/1")


def test_a_dvd_widescreen_clip_comes_back_with_its_display_aspect_and_square_pixels(tiny_handler, tmp_path):
    clip = tmp_path / "dvd.mp4"  # 216x144 stored, 256x144 shown: a size the output keeps whole
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=216x144:rate=30000/1001", "-frames:v", "3", "-vf", "setsar=32/27",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip))
    answer, out = restore(tiny_handler, clip, tmp_path, scale=1.0)
    written = next(s for s in list_streams(out) if s.kind == "video")
    assert written.sar == 1
    assert abs(display_aspect(out) / display_aspect(clip) - 1) < 0.01  # 16:9 in, 16:9 out
    assert answer["processing_info"]["pixel_aspect"] == {"sar": "32:27", "square_pixel_size": "256x144"}


# ----------------------------------------------------------------------------- variable frame rate

@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory) -> Path:
    """30 frames at 30 fps, then 10 at 10 fps (40 frames over 2.0 s), with 2.0 s of AAC audio."""
    clip = tmp_path_factory.mktemp("vfr") / "phone.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=1",
           "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1",
           "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
           "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]", "-map", "2:a",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-fps_mode", "vfr", "-c:a", "aac", str(clip))
    return clip


def seconds(path: Path) -> list[float]:
    timing = packet_timing(path, 0)
    return [float((start - timing.starts[0]) * timing.time_base) for start in timing.starts]


def test_a_variable_rate_is_found_and_each_frame_keeps_its_time(vfr_clip):
    info = probe_video(vfr_clip)
    assert info.frame_times is not None and info.frame_count == 40
    assert info.duration == pytest.approx(2.0, abs=1e-3)
    assert info.describe()["fps"] == "variable" and Fraction(info.describe()["average_fps"]) == 20


@pytest.mark.parametrize("codec, container", [("h264", "mp4"), ("h265", "mkv"), ("vp9", "webm")])
def test_the_writer_gives_every_frame_its_source_time(vfr_clip, tmp_path, codec, container):
    info = probe_video(vfr_clip)
    out = tmp_path / f"out.{container}"
    with VideoWriter(out, info.width, info.height, info.fps, audio_source=vfr_clip, codec=codec,
                     container=container, frame_times=info.frame_times) as writer:
        for frame in iter_frames(vfr_clip, info):
            writer.write(frame)
    slack = 1e-3 if container == "mp4" else 1.5e-3  # Matroska rounds times to the millisecond
    assert np.abs(np.subtract(seconds(out), seconds(vfr_clip))).max() <= slack
    assert abs(probe_video(out).duration - info.duration) <= 0.1  # within one frame
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the constant-rate pass is gone


def test_a_phone_clip_with_a_variable_rate_is_restored_with_its_timing_and_all_its_audio(
        tiny_handler, vfr_clip, tmp_path):
    answer, out = restore(tiny_handler, vfr_clip, tmp_path, res_h=48, res_w=64)
    assert np.abs(np.subtract(seconds(out), seconds(vfr_clip))).max() <= 1e-3
    assert float(packet_timing(out, 1).span) == pytest.approx(float(packet_timing(vfr_clip, 1).span), abs=0.03)
    info = answer["processing_info"]
    assert info["fps"] == "variable" and Fraction(info["average_fps"]) == 20 and info["frames"] == 40
    assert (info["decoder"], info["encoder"]) == ("cpu", "libx264")  # no GPU here: the silent fallbacks


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9", "av1", "mpeg2video"])
def test_without_a_gpu_nvdec_is_declined_quietly_and_decoding_stays_on_the_cpu(codec, caplog):
    assert not nvdec_works(codec)  # a real trial: ffmpeg cannot make CUDA frames on this machine
    assert (decoder_options(codec), decoder_name(codec)) == ([], "cpu")
    assert caplog.records == []


# ----------------------------------------------------------------------------- interlacing

@pytest.fixture(scope="module")
def interlaced_clip(tmp_path_factory) -> Path:
    """A pattern moving sideways at 50 fields per second, woven into 8 top-field-first frames at 25 fps (the
    motion between fields makes the combing idet sees), stored losslessly."""
    clip = tmp_path_factory.mktemp("interlaced") / "vhs.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=50", "-frames:v", "8",
           "-vf", "scroll=horizontal=0.03,interlace=scan=tff",
           "-c:v", "ffv1", "-field_order", "tt", str(clip))
    return clip


def decoded_copy(clip: Path, out: Path, **probe_options) -> int:
    """The frames the model would get, stored losslessly; returns their count."""
    info = probe_video(clip, **probe_options)
    with VideoWriter(out, info.width, info.height, info.fps, codec="h264", crf=0, container="mkv",
                     pix_fmt="yuv420p") as writer:
        for frame in iter_frames(clip, info):
            writer.write(frame)
    return writer.frames_written


def test_interlaced_frames_are_found_and_deinterlaced_only_when_they_should(interlaced_clip, tmp_path):
    interlaced, progressive = idet_counts(interlaced_clip)
    assert interlaced > progressive  # the clip is what it claims to be
    info = probe_video(interlaced_clip, deinterlace="auto")
    assert info.field_order == "tff" and info.deinterlace is not None and info.frame_count == 8
    assert decoded_copy(interlaced_clip, tmp_path / "auto.mkv", deinterlace="auto") == 8
    interlaced, progressive = idet_counts(tmp_path / "auto.mkv")
    assert progressive > 3 * interlaced
    assert decoded_copy(interlaced_clip, tmp_path / "off.mkv", deinterlace="off") == 8
    interlaced, progressive = idet_counts(tmp_path / "off.mkv")
    assert interlaced > progressive  # "off" leaves the fields woven


def test_field_rate_deinterlacing_doubles_the_frames_and_the_rate(interlaced_clip):
    frame_rate, field_rate = (probe_video(interlaced_clip, deinterlace="auto", deinterlace_rate=rate)
                              for rate in ("frame", "field"))
    assert (field_rate.frame_count, field_rate.fps) == (2 * frame_rate.frame_count, 2 * frame_rate.fps)
    assert sum(1 for _ in iter_frames(interlaced_clip, field_rate)) == 16 == field_rate.frame_count


def test_progressive_video_is_left_alone_and_on_forces_the_filter(tmp_path):
    clip = tmp_path / "progressive.mp4"  # (idet takes testsrc2's pattern for interlaced: bars scrolling instead)
    ffmpeg("-f", "lavfi", "-i", "smptehdbars=size=160x120:rate=25,scroll=horizontal=0.01", "-frames:v", "8",
           "-c:v", "libx264", str(clip))
    auto = probe_video(clip, deinterlace="auto")
    assert auto.deinterlace is None and auto.field_order == "progressive"
    assert probe_video(clip, deinterlace="on").deinterlace is not None
    off = probe_video(clip, deinterlace="off")
    assert off.deinterlace is None and off.field_order is None


def test_an_interlaced_capture_through_the_handler_reports_what_was_done(tiny_handler, interlaced_clip, tmp_path):
    answer, out = restore(tiny_handler, interlaced_clip, tmp_path, res_h=48, res_w=64, deinterlace_rate="field")
    assert answer["processing_info"]["interlace"] == {
        "found": "tff", "deinterlaced": {"filter": "bwdif", "parity": "tff", "rate": "field"}}
    written = probe_video(out)
    assert (written.frame_count, written.fps) == (16, 50)


# ----------------------------------------------------------------------------- colour tags

@pytest.mark.parametrize("text, expected", [
    ("yuv420p(tv, bt470bg/smpte170m/bt709, top first)", ("yuv420p", ColorTags("tv", "bt470bg", "smpte170m", "bt709"),
                                                         "tff")),
    ("yuv420p(tv, bt709, progressive)", ("yuv420p", ColorTags("tv", "bt709", "bt709", "bt709"), "progressive")),
    ("yuv420p(tv, bt470bg)", ("yuv420p", ColorTags("tv", "bt470bg", "bt470bg", "gamma28"), None)),  # one enum value
    ("yuvj420p(pc)", ("yuvj420p", ColorTags("pc"), None)),
    ("yuv420p(bottom coded first (swapped))", ("yuv420p", ColorTags(), "bff")),
    ("gray", ("gray", ColorTags(), None)),
])
def test_the_stream_listing_gives_colour_tags_and_field_order(text, expected):
    assert _pixel_format(text) == expected


def test_colour_tags_are_kept_from_the_source_and_bt709_fills_the_rest(tmp_path):
    clip = tmp_path / "sd.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "2",
           "-vf", "setparams=color_primaries=smpte170m:color_trc=smpte170m:colorspace=smpte170m:range=tv",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip))
    info = probe_video(clip)
    assert info.color == ColorTags("tv", "smpte170m", "smpte170m", "smpte170m")
    out = tmp_path / "out.mp4"
    with VideoWriter(out, info.width, info.height, info.fps, crf=0, color=info.color) as writer:
        frames = list(iter_frames(clip, info))
        for frame in frames:
            writer.write(frame)
    assert probe_video(out).color == info.color
    back = list(iter_frames(out, probe_video(out)))  # the same matrix both ways: the colours round-trip
    assert np.abs(np.stack(back).astype(int) - np.stack(frames)).mean() < 4  # 4:2:0 on sharp colour edges
    assert output_color(ColorTags(matrix="ycgco")) == output_color(None) == ColorTags("tv", "bt709", "bt709", "bt709")
    assert output_color(ColorTags(range="pc")) == ColorTags("pc", "bt709", "bt709", "bt709")


# ----------------------------------------------------------------------------- a part of a video

@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """21 pattern frames at 25 fps (0.84 s) with 0.84 s of AAC audio."""
    return write_video(tmp_path_factory.mktemp("part") / "long.mp4", pattern_frames(21), Fraction(25),
                       audio_args=("-c:a", "aac"))


def test_a_part_is_chosen_by_time_and_read_by_frame_number(long_clip):
    part = select_part(probe_video(long_clip), 0.2, 0.36, "media")
    assert (part.frame_count, part.part.first) == (9, 5)  # frames 5..13 show at 0.20 .. 0.52 s
    frames = list(iter_frames(long_clip, part))
    assert [closest_pattern_frame(frame, 21)[0] for frame in frames] == list(range(5, 14))
    assert select_part(probe_video(long_clip), 0.8, None, "media").frame_count == 1
    with pytest.raises(RestoreError, match="start_time 2 s is past the end of media"):
        select_part(probe_video(long_clip), 2.0, 1.0, "media")


def test_a_preview_restores_its_frames_with_the_audio_cut_to_match(tiny_handler, long_clip, tmp_path):
    answer, out = restore(tiny_handler, long_clip, tmp_path, res_h=48, res_w=64, start_time=0.2, duration=0.36)
    written = probe_video(out)
    assert written.frame_count == 9 and written.duration == pytest.approx(0.36)
    assert float(packet_timing(out, 1).span) == pytest.approx(0.36, abs=0.03)
    assert answer["processing_info"]["range"] == {"first_frame": 5, "frames": 9, "start_time": 0.2,
                                                   "duration": 0.36}


def test_a_preview_at_a_chunk_start_restores_its_inner_frames_as_the_whole_run_does(tiny_handler, long_clip,
                                                                                      tmp_path):
    # (with condition noise: every chunk is noised at the whole video's level, not the part's)
    options = {"res_h": 48, "res_w": 64, "chunk_frames": 5, "chunk_overlap": 1, "crf": 0, "cond_noise_scale": 0.3}
    _, whole = restore(tiny_handler, long_clip, tmp_path / "whole", **options)
    # frames 8..16 are chunks [8, 13) and [12, 17) of the whole run's plan (steps of 4)
    _, part = restore(tiny_handler, long_clip, tmp_path / "part", start_time=8 / 25, duration=9 / 25, **options)
    whole_frames = read_frames(whole, probe_video(whole))
    part_frames = read_frames(part, probe_video(part))
    assert len(part_frames) == 9
    # the edge frames are cross-faded with neighbouring chunks only in the whole run
    np.testing.assert_array_equal(part_frames[1:-1], whole_frames[9:16])
