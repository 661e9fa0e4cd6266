"""Long clips through the real handler on the tiny install: host memory stays flat as the clip grows, and
requested chunks give back every frame, in order."""

import base64
import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from media_factory import closest_pattern_frame, pattern_frames, write_video
from worker_server import REPO_ROOT

from seedvr.io.media.video import iter_frames, probe_video

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "seedvr.tiny", str(root)], cwd=REPO_ROOT, check=True, capture_output=True)
    return root


def test_peak_memory_of_a_2000_frame_clip_stays_near_that_of_200_frames(tiny_dir):
    """benchmarks/bench_rss.py restores each clip (256x256 in, 16x16 out) in a fresh handler process and
    reads that process's peak RSS. Holding the clip whole would take over 2 GB more at 2000 frames (its
    float32 input alone is 1.5 GB); streamed through chunks, the peak barely moves."""
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_rss.py", "--frames", "200", "2000", "--json", "--tiny", str(tiny_dir)],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=600)
    short, long = (json.loads(line) for line in completed.stdout.strip().splitlines())
    for result in (short, long):
        assert result["error"] is None and result["frames_out"] == result["frames"], result
        assert result["retries"] == 0
    assert (short["plan"]["chunks"], long["plan"]["chunks"]) == (2, 18)
    ratio = long["peak_rss_bytes"] / short["peak_rss_bytes"]
    print(f"peak RSS: 200 frames {short['peak_rss_bytes'] >> 20} MiB, 2000 frames {long['peak_rss_bytes'] >> 20} "
          f"MiB, ratio {ratio:.2f}")
    assert ratio < 2.0


@pytest.fixture(scope="module")
def handler(tiny_handler):
    return tiny_handler


def test_requested_chunks_keep_every_frame_in_order(handler, tmp_path):
    frames = 60
    source = write_video(tmp_path / "in.mp4", pattern_frames(frames, 64, 48), Fraction(25),
                         ("-c:v", "libx264", "-pix_fmt", "yuv444p", "-qp", "0"))
    media = base64.b64encode(source.read_bytes()).decode()
    answer = handler({"id": "long", "input": {"action": "restore", "media": media, "res_h": 48, "res_w": 64,
                                              "chunk_frames": 21, "chunk_overlap": 5, "compare": True}})
    assert "error" not in answer, answer
    plan = answer["processing_info"]["plan"]
    assert (plan["chunk_frames"], plan["chunk_overlap"], plan["chunks"]) == (21, 5, 4)
    out = tmp_path / "out.mp4"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    info = probe_video(out)
    restored = np.stack(list(iter_frames(out, info)))
    assert restored.shape == (frames, 48, 64, 3)
    # random weights give noise, but the colour fix carries each input frame's mean colour over (see
    # test_chunking): most frames must be nearest their own pattern colour, none after a shift by one frame
    nearest = np.array([closest_pattern_frame(frame, 16)[0] for frame in restored])
    own = np.arange(frames) % 16
    assert (nearest == own).mean() >= 0.75
    assert (nearest[1:] == own[:-1]).mean() <= 0.25
    assert answer["compare"][0]  # the middle input and output frames were kept for the comparison
