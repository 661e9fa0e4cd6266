"""`python -m seedvr restore`: a folder of mixed images and videos through the worker's code path; its progress bars,
warnings and quiet logs."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio_ffmpeg
import pytest
from media_factory import make_image, make_video
from PIL import Image
from worker_server import REPO_ROOT, tiny_environment

from seedvr.io.media.encoders import NVENC_MIN_SIDE, available_encoders
from seedvr.io.media.video import probe_video, read_frames
from seedvr.serving.answer import RANDOM_WEIGHTS_WARNING
from seedvr.tools.cli import answer_warnings, print_warnings

slow = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane


def run_cli(tiny_dir, *args):
    with tempfile.TemporaryDirectory(prefix="seedvr-test-jobs-") as job_tmp:  # the process's TMPDIR, removed after
        return subprocess.run([sys.executable, "-m", "seedvr", "restore", *map(str, args)], cwd=REPO_ROOT,
                              env=tiny_environment(tiny_dir, Path(job_tmp)), capture_output=True, text=True,
                              timeout=600)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    make_image(folder, "rgba_png")
    make_image(folder, "jpeg")
    make_video(folder, "mp4_aac")  # clip.mp4
    make_video(folder, "gif")      # clip.gif: same stem as the mp4
    return folder


@slow
def test_restores_a_folder_of_mixed_media(tiny_dir, mixed_folder, tmp_path):
    result = run_cli(tiny_dir, mixed_folder, "-o", tmp_path, "--res-h", "64", "--res-w", "96", "--compare",
                     "--model-type", "seedvr2_7b")
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(["rgba.restored.png", "rgba.compare.png", "photo.restored.png", "photo.compare.png",
                              "clip_mp4.restored.mp4", "clip_mp4.compare.png", "clip_gif.restored.mp4",
                              "clip_gif.compare.png"])
    assert probe_video(tmp_path / "clip_mp4.restored.mp4").frame_count == probe_video(mixed_folder / "clip.mp4").frame_count
    assert probe_video(tmp_path / "clip_mp4.restored.mp4").has_audio
    assert Image.open(tmp_path / "rgba.restored.png").mode == "RGBA"
    summary = result.stdout.splitlines()
    assert summary[0].split() == ["file", "kind", "input", "output", "frames", "seconds", "status"]
    assert len(summary) == 5 and all(line.rstrip().endswith("ok") for line in summary[1:])
    drawn = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    frames = probe_video(mixed_folder / "clip.mp4").frame_count
    counts = {int(match[1]) for line in drawn if (match := re.search(rf"^clip\.mp4: .*\| *(\d+)/{frames} \[", line))}
    assert counts == set(range(frames + 1)), drawn  # every frame drawn, not only 0 and the end (Progress's 1 s pace)
    assert drawn.count(f"warning: {RANDOM_WEIGHTS_WARNING}") == 1, drawn  # the answers' warning, once for all files
    assert " INFO " not in result.stderr, result.stderr  # the worker's logs below WARNING stay quiet


@slow
def test_a_failed_file_is_reported_and_the_others_run_with_warnings_but_no_noise(tiny_dir, tmp_path):
    """notes.txt fails; a picture with alpha (written as jpeg: its answer warns that the alpha is dropped) and a
    video are restored. The video comes out at NVENC's smallest size, and on this CPU machine the
    bundled ffmpeg lists h264_nvenc but cannot run it: the trial encode fails, and its ffmpeg error (logged at
    INFO, shown because runpod's import sets the root logger to INFO) must not reach the terminal."""
    assert "h264_nvenc" in available_encoders()  # so the trial runs: the test cannot pass for want of it
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_image(inputs, "rgba_png")
    (inputs / "notes.txt").write_text("not media\n")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc2=s={NVENC_MIN_SIDE}x{NVENC_MIN_SIDE}:r=24", "-frames:v", "2", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(inputs / "square.mp4")], check=True)
    result = run_cli(tiny_dir, inputs, "-o", tmp_path / "out", "--scale", "1", "--format", "jpeg")  # sizes stay
    assert result.returncode == 1
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"rgba.restored.jpg", "square.restored.mp4"}
    assert "UNSUPPORTED_MEDIA" in result.stdout
    assert probe_video(tmp_path / "out" / "square.restored.mp4").width == NVENC_MIN_SIDE  # NVENC is tried at this size
    assert "nvenc" not in result.stderr.lower(), result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings[0] == f"warning: {RANDOM_WEIGHTS_WARNING}"
    assert len(warnings) == 2 and "transparency" in warnings[1] and warnings[1].endswith(" (rgba.png)"), warnings


@slow
def test_options_are_validated_by_the_schema(tiny_dir, tmp_path):
    result = run_cli(tiny_dir, tmp_path, "-o", tmp_path / "out", "--codec", "h265", "--container", "webm")
    assert result.returncode == 2 and "container" in result.stderr
    result = run_cli(tiny_dir, tmp_path, "-o", tmp_path / "out", "--res-h", "5")
    assert result.returncode == 2 and "res_h must be an integer between 16 and 8192" in result.stderr


@slow
def test_sp_size_2_runs_two_rank_processes_and_equals_one_process(tiny_dir, tmp_path):
    """The command line passes sp_size on: the model runs in two rank processes (gloo on CPU), and the frames
    equal the single-process run up to the float reduction order."""
    source = make_video(tmp_path, "mp4_aac")
    outputs = {}
    for sp_size in (1, 2):
        outdir = tmp_path / f"sp{sp_size}"
        result = run_cli(tiny_dir, source, "-o", outdir, "--res-h", "64", "--res-w", "96", "--crf", "0",
                         "--sp-size", str(sp_size))
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[sp_size] = (result.stderr, outdir / "clip.restored.mp4")
    assert "seedvr2_3b (normal) on 2 processes (cpu, cpu)" in outputs[2][0]
    assert "seedvr2_3b (normal) on cpu" in outputs[1][0]
    one, two = (read_frames(path, probe_video(path)).astype(int) for _, path in outputs.values())
    assert one.shape == two.shape and one.std() > 5
    assert abs(one - two).max() <= 6 and abs(one - two).mean() < 0.01


def test_warnings_are_the_answers_each_printed_once(capsys):
    """`warning` (random weights) and every entry of an answer's `warnings`; one that every restored file has
    without file names, any other after the files it concerns."""
    assert answer_warnings({"success": True}) == []
    assert answer_warnings({"warning": "noise", "warnings": ["audio dropped", "rate rounded"]}) == [
        "noise", "audio dropped", "rate rounded"]
    rows = [{"file": "in/a.mp4", "status": "ok", "warnings": ["noise", "audio dropped"]},
            {"file": "in/b.png", "status": "ok", "warnings": ["noise"]},
            {"file": "in/c.txt", "status": "UNSUPPORTED_MEDIA: ...", "warnings": []}]
    print_warnings(rows)
    assert capsys.readouterr().err.splitlines() == ["warning: noise", "warning: audio dropped (a.mp4)"]
    rows[1]["warnings"] = []
    print_warnings(rows)
    assert capsys.readouterr().err.splitlines() == ["warning: noise (a.mp4)", "warning: audio dropped (a.mp4)"]
