"""Frame interpolation through the handler's body (`handler.serve`) on the tiny random-weight installation, with
clips made here: the frame count and rate, the duration, the audio copied bit for bit, scene cuts, a variable
frame rate, both methods and the checks made before any work.

The clip: 6 red frames, then 6 blue ones (a hard cut), at 30000/1001 fps with AAC audio. The tiny model's output
is noise, but its colour fix keeps each scene's colour, and the same request without interpolation gives the
frames the interpolated video must keep: every source frame, unchanged, at its place, and across the cut the
nearer of the two, never a mix.
"""

import base64
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_factory import FFMPEG, make_image, write_video
from rife_factory import write_random_rife

from seedvr.io.media.ffmpeg import packet_timing
from seedvr.io.media.video import probe_video, read_frames
from seedvr.models.rife import RIFE_WEIGHTS

pytestmark = pytest.mark.slow

NTSC = Fraction(30000, 1001)
RED, BLUE = (220, 30, 30), (30, 30, 220)
SCENE_FRAMES = 6  # per colour: the cut lies between frames 5 and 6
LOSSLESS = {"res_h": 48, "res_w": 64, "codec": "h264", "crf": 0}  # 64x48 out: the tiny model's own size


@pytest.fixture(scope="module")
def cut_clip(tmp_path_factory) -> Path:
    frames = np.zeros((2 * SCENE_FRAMES, 48, 64, 3), dtype=np.uint8)
    frames[:SCENE_FRAMES], frames[SCENE_FRAMES:] = RED, BLUE
    return write_video(tmp_path_factory.mktemp("cut") / "cut.mp4", frames, NTSC, audio_args=("-c:a", "aac"))


@pytest.fixture(scope="module")
def rife_ckpts(tiny_dir, tmp_path_factory) -> Path:
    """The tiny installation's checkpoints plus a RIFE checkpoint with random weights, in a folder of their own."""
    folder = tmp_path_factory.mktemp("with-rife")
    for checkpoint in (tiny_dir / "ckpts").iterdir():
        (folder / checkpoint.name).symlink_to(checkpoint)
    write_random_rife(folder / RIFE_WEIGHTS.filename)
    return folder


@pytest.fixture
def with_rife(rife_ckpts, monkeypatch) -> None:
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(rife_ckpts))


def restore(tiny_handler, clip: Path, folder: Path, name: str, **options) -> tuple[dict, Path]:
    answer = tiny_handler({"id": name, "input": {"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(),
                                                 **LOSSLESS, **options}})
    assert "error" not in answer, answer
    out = folder / f"{name}.mp4"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    return answer, out


@pytest.fixture(scope="module")
def plain(tiny_handler, cut_clip, tmp_path_factory) -> np.ndarray:
    """The restored frames of the same request without interpolation (decoded, lossless)."""
    _, out = restore(tiny_handler, cut_clip, tmp_path_factory.mktemp("plain"), "plain")
    frames = read_frames(out, probe_video(out))
    assert len(frames) == 2 * SCENE_FRAMES and frames.std() > 5  # noise in the colours of the scenes
    return frames


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(packet) for packet in container.demux(container.streams.audio[0]) if packet.size]


def check_kept_and_cut(out_frames: np.ndarray, plain: np.ndarray, factor: Fraction) -> None:
    """Every source frame at its place, unchanged; across the cut (positions between 5 and 6) the nearer one."""
    for index, frame in enumerate(out_frames):
        position = index / factor
        if position.denominator == 1:
            assert np.array_equal(frame, plain[int(position)]), index
        elif SCENE_FRAMES - 1 < position < SCENE_FRAMES:
            nearer = SCENE_FRAMES - 1 if position <= SCENE_FRAMES - Fraction(1, 2) else SCENE_FRAMES
            assert np.array_equal(frame, plain[nearer]), (index, position)


@pytest.mark.parametrize("method", ["mci", "rife"])
def test_factor_2_doubles_the_frames_and_the_rate_and_keeps_the_duration_and_the_audio(
        tiny_handler, cut_clip, plain, with_rife, tmp_path, method):
    answer, out = restore(tiny_handler, cut_clip, tmp_path, method, interpolate_factor=2, interpolation=method)
    source, info = probe_video(cut_clip), probe_video(out)
    assert (info.frame_count, info.fps) == (2 * source.frame_count, 2 * NTSC)  # 2N frames at 60000/1001
    assert abs(info.duration - source.duration) <= float(1 / info.fps)
    assert answer["processing_info"]["interpolation"] == {
        "method": method, "factor": 2.0, "output_fps": "60000/1001", "frames": 24, "source_frames": 12}
    assert answer["processing_info"]["fps"] == "30000/1001"  # the source's, as read
    assert audio_packets(out) == audio_packets(cut_clip)  # copied, bit for bit
    frames = read_frames(out, info)
    check_kept_and_cut(frames, plain, Fraction(2))
    # made, not repeated, between the red frames (the noise of the blue ones changes so much from frame to frame
    # that the fdiff scene test also finds a cut right after the real one: a drop in the difference is a change)
    assert not any(np.array_equal(frames[index], kept) for index in (1, 3, 5, 7, 9) for kept in plain)


def test_a_variable_rate_stays_variable_with_new_frames_in_proportion_at_a_factor_of_2_5(tiny_handler, tmp_path):
    clip = tmp_path / "phone.mp4"  # 4 frames at 10 fps, then 2 at 5 fps: 0.8 s, 7.5 fps on average
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.4",
                    "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=5:duration=0.4", "-filter_complex",
                    "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-fps_mode", "vfr", str(clip)], check=True)
    assert probe_video(clip).frame_times is not None
    answer, out = restore(tiny_handler, clip, tmp_path, "vfr", interpolate_factor=2.5)
    timing = packet_timing(out, 0)
    seconds = [float((start - timing.starts[0]) * timing.time_base) for start in timing.starts]
    # ceil(2.5 * 6) = 15 frames; frame k at position k / 2.5 between the source frames at 0, .1, .2, .3, .4, .6
    # (ending at .8): position 1.2 is .2 of the way from .1 to .2, .12; from .4 on the steps are .08
    assert seconds == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36, 0.4, 0.48, 0.56, 0.64,
                                     0.72], abs=1e-3)
    assert probe_video(out).duration == pytest.approx(0.8, abs=1e-3)  # as long as the source
    assert answer["processing_info"]["interpolation"] == {  # auto, and no RIFE weights: mci
        "method": "mci", "factor": 2.5, "output_fps": "variable", "average_output_fps": "75/4", "frames": 15,
        "source_frames": 6}


def test_interpolation_is_refused_before_any_work_for_images_and_for_rife_without_weights(
        tiny_handler, cut_clip, tmp_path):
    image = make_image(tmp_path, "rgba_png")[0]
    answer = tiny_handler({"id": "image", "input": {"action": "restore", "interpolate_factor": 2,
                                                    "media": base64.b64encode(image.read_bytes()).decode()}})
    assert answer["error"].startswith("INVALID_INPUT: interpolate_factor applies to videos"), answer
    answer = tiny_handler({"id": "no-rife", "input": {"action": "restore", "interpolate_factor": 2,
                                                      "interpolation": "rife",
                                                      "media": base64.b64encode(cut_clip.read_bytes()).decode()}})
    assert answer["error"].startswith("MODEL_NOT_AVAILABLE: interpolation 'rife' needs the RIFE weights"), answer
    assert "python -m seedvr.weights download --model rife" in answer["error"]
