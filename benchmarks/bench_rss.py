"""Peak host memory of the worker against clip length, through the real handler on the tiny install (CPU).

    python benchmarks/bench_rss.py                          # 50, 200, 800, 2000 frames: a markdown table
    python benchmarks/bench_rss.py --frames 200 2000 --json

Each clip (ffmpeg's testsrc, 256x256 at 25 fps, h264) is restored to a 16x16 output by a fresh process
running `handler.serve` with the random-weight installation of `python -m seedvr.tiny`; its peak RSS
is the kernel's ru_maxrss for that process (os.wait4). Frames stream from the decoder through temporal
chunks into the encoder, so the peak should not grow with the clip's length; the output frame count is
checked against the input's.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FRAMES = (50, 200, 800, 2000)

# Runs in the measured process: one restore job from a JSON file, a short summary to another file.
RUNNER = """
import base64, json, sys
from pathlib import Path
import handler
from seedvr.io.media.video import probe_video
job = json.loads(Path(sys.argv[1]).read_text())
answer = handler.serve(job)
summary = {"error": answer.get("error")}
if "error" not in answer:
    out = Path(sys.argv[2]).with_suffix(".mp4")
    out.write_bytes(base64.b64decode(answer["media"][0]))
    info = answer["processing_info"]
    summary.update(frames_out=probe_video(out).frame_count, resolution=answer["resolution"], plan=info["plan"],
                   retries=len(info["retries"]), timings=info["timings"])
Path(sys.argv[2]).write_text(json.dumps(summary))
"""


def make_clip(path: Path, frames: int, size: int) -> Path:
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
               "-i", f"testsrc=size={size}x{size}:rate=25", "-frames:v", str(frames), "-c:v", "libx264",
               "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(command, check=True)
    return path


def tiny_environment(tiny_dir: Path) -> dict:
    return dict(os.environ, SEEDVR_CONFIG_DIR=str(tiny_dir), SEEDVR_CKPT_DIR=str(tiny_dir / "ckpts"),
                SEEDVR_EMBEDDINGS_DIR=str(tiny_dir / "embeddings"), PYTHONUNBUFFERED="1")


def measure(frames: int, tiny_dir: Path, workdir: Path, size: int = 256, res: int = 16) -> dict:
    """Restore a `frames`-frame clip in a fresh handler process: its peak RSS, wall time and summary."""
    clip = make_clip(workdir / f"clip{frames}.mp4", frames, size)
    job = {"id": f"rss-{frames}", "input": {"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(),
                                           "res_h": res, "res_w": res}}
    job_file, summary_file = workdir / f"job{frames}.json", workdir / f"summary{frames}.json"
    job_file.write_text(json.dumps(job))
    del job
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(job_file), str(summary_file)], cwd=REPO_ROOT,
                               env=tiny_environment(tiny_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"the worker process failed for {frames} frames:\n{stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    return {"frames": frames, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - started,
            **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=list(DEFAULT_FRAMES))
    parser.add_argument("--size", type=int, default=256, help="input side in pixels")
    parser.add_argument("--res", type=int, default=16, help="output side in pixels")
    parser.add_argument("--tiny", type=Path, help="an existing `python -m seedvr.tiny` folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per clip")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        workdir = Path(tmp)
        tiny_dir = args.tiny
        if tiny_dir is None:
            tiny_dir = workdir / "tiny"
            subprocess.run([sys.executable, "-m", "seedvr.tiny", str(tiny_dir)], cwd=REPO_ROOT, check=True,
                           capture_output=True)
        if not args.json:
            print(f"| frames ({args.size}x{args.size} in, {args.res}x{args.res} out) | peak RSS (MiB) | wall (s) "
                  f"| chunks | frames out |")
            print("|---|---|---|---|---|")
        for frames in args.frames:
            result = measure(frames, tiny_dir, workdir, args.size, args.res)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                chunks = result["plan"]["chunks"] if result.get("plan") else "-"
                print(f"| {frames} | {result['peak_rss_bytes'] / 2**20:.0f} | {result['wall_s']:.1f} | {chunks} "
                      f"| {result.get('frames_out', result.get('error'))} |", flush=True)


if __name__ == "__main__":
    main()
