"""`python -m seedvr restore`: a folder of mixed images and videos through the worker's code path."""

import subprocess
import sys

import pytest
from media_factory import make_image, make_video
from PIL import Image
from worker_server import REPO_ROOT, make_job_tmp, tiny_environment

from seedvr.io.media.video import probe_video, read_frames

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane


def run_cli(tiny_dir, *args):
    return subprocess.run([sys.executable, "-m", "seedvr", "restore", *map(str, args)], cwd=REPO_ROOT,
                          env=tiny_environment(tiny_dir, make_job_tmp()), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    make_image(folder, "rgba_png")
    make_image(folder, "jpeg")
    make_video(folder, "mp4_aac")  # clip.mp4
    make_video(folder, "gif")      # clip.gif: same stem as the mp4
    return folder


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


def test_a_failed_file_is_reported_and_the_others_still_run(tiny_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_image(inputs, "jpeg")
    (inputs / "notes.txt").write_text("not media\n")
    result = run_cli(tiny_dir, inputs, "-o", tmp_path / "out", "--res-h", "64", "--res-w", "96")
    assert result.returncode == 1
    assert (tmp_path / "out" / "photo.restored.png").is_file()
    assert "UNSUPPORTED_MEDIA" in result.stdout


def test_options_are_validated_by_the_schema(tiny_dir, tmp_path):
    result = run_cli(tiny_dir, tmp_path, "-o", tmp_path / "out", "--codec", "h265", "--container", "webm")
    assert result.returncode == 2 and "container" in result.stderr
    result = run_cli(tiny_dir, tmp_path, "-o", tmp_path / "out", "--res-h", "5")
    assert result.returncode == 2 and "res_h must be an integer between 16 and 8192" in result.stderr


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
