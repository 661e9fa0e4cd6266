"""The handler's media overhead against a plain ffmpeg transcode, and its peak RSS for a large payload.

    python benchmarks/bench_handler_overhead.py [--seconds 10] [--payload-mb 50]

Overhead: the worker's own path around the model — base64 decode, sniff, probe, frame decode, H.264 encode
(crf 18, the default output), base64 encode of the result — with the model left out (frames go straight
from the decoder to the encoder), against `ffmpeg -i clip -c:v libx264 -crf 18 -pix_fmt yuv420p -c:a copy`
on the same clip, timed in the same run (median of --repeats). Goal: ratio <= 1.10. CPU seconds (this process
and its ffmpeg children, user + system) are printed beside the wall time: on a shared machine they are the
steadier measure of the work each path does.

Peak RSS: the same path in a fresh process for a payload of about --payload-mb MB, as the growth of the
process's peak RSS over its RSS after start-up (imports). Goal: <= 4x the payload.
"""

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seedvr.io.inputs import gather_inputs
from seedvr.io.media.ffmpeg import ffmpeg_exe
from seedvr.io.media.video import iter_frames
from seedvr.io.outputs import deliver_output, video_writer
from seedvr.serving.schema import RestoreRequest, parse_request
from seedvr.serving.specs import restore_spec


def make_clip(path: Path, seconds: float, size: str, bitrate: str, noise: int = 0) -> Path:
    """A moving test pattern with AAC audio (never a static or black clip); `noise` > 0 overlays temporal
    noise of that strength, which x264 cannot compress: the file size then follows the bitrate."""
    source = f"testsrc2=size={size}:rate=30" + (f",noise=alls={noise}:allf=t" if noise else "")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", source,
                    "-f", "lavfi", "-i", "sine=frequency=440", "-t", str(seconds), "-c:v", "libx264",
                    "-b:v", bitrate, "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


def ffmpeg_transcode(clip: Path, out: Path) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(clip), "-c:v", "libx264", "-crf", "18",
                    "-pix_fmt", "yuv420p", "-c:a", "copy", str(out)], check=True)


def worker_path(payload: str, workdir: Path) -> str:
    """What the worker does around the model, on a base64 payload; returns the base64 answer."""
    request = parse_request({"action": "restore", "media": payload})
    assert isinstance(request, RestoreRequest)
    spec = restore_spec(request)
    item = gather_inputs(spec.media, workdir)[0]
    assert item.video is not None, "the clip is a video"
    writer, output = video_writer(spec.video, item, workdir, item.width, item.height)
    with writer:
        for frame in iter_frames(item.path, item.video):
            writer.write(frame)
    return str(deliver_output(spec.delivery, output, "bench").value)


def peak_rss_child(clip: Path) -> None:
    """Run in a fresh process: print the peak RSS growth of one worker path over the RSS after imports."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    payload = base64.b64encode(clip.read_bytes()).decode()
    with tempfile.TemporaryDirectory() as tmp:
        answer = worker_path(payload, Path(tmp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth_bytes": peak - before, "answer_chars": len(answer)}))


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--payload-mb", type=float, default=50.0)
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        peak_rss_child(args.rss_child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = make_clip(tmp / "clip.mp4", args.seconds, args.size, "1500k")
        payload = base64.b64encode(clip.read_bytes()).decode()
        plain, ours, plain_cpu, ours_cpu = [], [], [], []
        for run in range(args.repeats):
            started, cpu = time.perf_counter(), cpu_seconds()
            ffmpeg_transcode(clip, tmp / f"plain{run}.mp4")
            plain.append(time.perf_counter() - started)
            plain_cpu.append(cpu_seconds() - cpu)
            started, cpu = time.perf_counter(), cpu_seconds()
            with tempfile.TemporaryDirectory(dir=tmp) as workdir:
                worker_path(payload, Path(workdir))
            ours.append(time.perf_counter() - started)
            ours_cpu.append(cpu_seconds() - cpu)
        print(f"clip: {args.size}, {args.seconds:g} s at 30 fps with AAC, {clip.stat().st_size / 1e6:.1f} MB")
        print(f"| path | wall seconds (median of {args.repeats}) | CPU seconds (median) |")
        print("|---|---|---|")
        print(f"| plain ffmpeg transcode (libx264 crf 18) | {statistics.median(plain):.2f} | "
              f"{statistics.median(plain_cpu):.2f} |")
        print(f"| worker path without the model | {statistics.median(ours):.2f} | {statistics.median(ours_cpu):.2f} |")
        print(f"| ratio | {statistics.median(ours) / statistics.median(plain):.3f} | "
              f"{statistics.median(ours_cpu) / statistics.median(plain_cpu):.3f} |")

        big = make_clip(tmp / "big.mp4", args.seconds, "1280x720", f"{int(args.payload_mb * 8e6 / args.seconds)}",
                        noise=40)
        # the measurement returns the answer inline, whatever its size: no limit for this child
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(big)], capture_output=True,
                                text=True, check=True, env={**os.environ, "SEEDVR_BASE64_LIMIT_BYTES": str(2**40)})
        child = json.loads(result.stdout.strip().splitlines()[-1])
        growth, size = child["growth_bytes"], big.stat().st_size
        print(f"\npayload {size / 1e6:.1f} MB (base64 {len(base64.b64encode(big.read_bytes())) / 1e6:.1f} MB), "
              f"answer {child['answer_chars'] / 1e6:.1f} MB of base64: peak RSS growth {growth / 1e6:.1f} MB = "
              f"{growth / size:.2f}x the payload")


if __name__ == "__main__":
    main()
