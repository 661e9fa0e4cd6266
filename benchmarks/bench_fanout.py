"""One clip restored by one worker and fanned out over N, through RunPod's endpoint API emulated on loopback (CPU).

    python benchmarks/bench_fanout.py                                  # 61 frames of 16x16, workers 1 and 3
    python benchmarks/bench_fanout.py --frames 1500 --side 32 --chunk 121 --overlap 9 --workers 1 3

The parts are the tests' (tests/test_fanout.py): worker servers (`python handler.py --rp_serve_api`, the tiny
random-weight install of `python -m seedvr.tiny`, one torch thread each), tests/endpoint_emulator.py handing each
job to a free server, a moto S3 server as the bucket. Each run's wall time is from /run to COMPLETED as the
emulator sees it; the coordinator's peak RSS is sampled every 50 ms (psutil, its worker process). The fanned-out
frames are compared with the single worker's (decoded crf 0 output). The tiny model on shared CPU cores says
how the plumbing scales, not how a GPU endpoint does: each worker there has a GPU of its own.
"""

import argparse
import base64
import logging
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import boto3
import numpy as np
import psutil
from moto import server as moto_server

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]

from endpoint_emulator import EndpointEmulator  # noqa: E402
from media_factory import pattern_frames, write_video  # noqa: E402
from worker_server import WorkerServer, tiny_environment  # noqa: E402

from seedvr.io.media.video import probe_video, read_frames  # noqa: E402

KEY = "bench-key"
BUCKET = "bench"


class PeakRss:
    """The largest RSS of a process while the block runs, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self) -> "PeakRss":
        self.before = self.process.memory_info().rss
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=9)
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    servers_needed = max(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "seedvr.tiny", str(root / "tiny")], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        host, port = s3.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="x").create_bucket(Bucket=BUCKET)
        emulator = EndpointEmulator(KEY)
        (root / "jobs").mkdir()
        env = {**tiny_environment(root / "tiny", root / "jobs"), "BUCKET_ENDPOINT_URL": f"http://{host}:{port}/{BUCKET}",
               "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s", "SEEDVR_ENDPOINT_URL": emulator.url,
               "RUNPOD_API_KEY": KEY, "SEEDVR_ALLOW_PRIVATE_URLS": "1", "OMP_NUM_THREADS": "1"}
        with ThreadPoolExecutor(servers_needed) as pool:
            servers = list(pool.map(lambda i: WorkerServer(env, root / f"worker{i}.log"), range(servers_needed)))
        names = [f"w{i}" for i in range(servers_needed)]
        for name, server in zip(names, servers):
            emulator.add_server(name, server.url)
        try:
            clip = write_video(root / "clip.mp4", pattern_frames(args.frames, args.side, args.side), Fraction(25),
                               audio_args=("-c:a", "aac"))
            media = base64.b64encode(clip.read_bytes()).decode()
            options = {"res_h": args.side, "res_w": args.side, "chunk_frames": args.chunk,
                       "chunk_overlap": args.overlap, "crf": 0}
            for name in names:  # every server loads the model before anything is timed
                emulator.wait(emulator.submit({"action": "initialize", "model_type": "seedvr2_3b"}, name), 300)
            reference = None
            print(f"{args.frames} frames of {args.side}x{args.side}, chunks of {args.chunk} overlapping by "
                  f"{args.overlap}, {servers_needed} worker servers on {psutil.cpu_count()} CPUs\n")
            print("| workers | wall s | coordinator peak RSS MB (before) | frames equal to workers 1 |")
            print("|---|---|---|---|")
            tables = []
            for workers in args.workers:
                job_id = emulator.submit({"action": "restore", "media": media, "workers": workers, **options}, names[0])
                with PeakRss(servers[0].process.pid) as rss:
                    job = emulator.wait(job_id, 3600)
                assert job["status"] == "COMPLETED", job
                answer = job["output"]
                out = root / f"out{workers}.mp4"
                out.write_bytes(base64.b64decode(answer["media"][0]))
                frames = read_frames(out, probe_video(out))
                reference = frames if reference is None else reference
                equal = int(sum(np.array_equal(a, b) for a, b in zip(frames, reference)))
                print(f"| {workers} | {job['finished'] - job['submitted']:.2f} | {rss.peak / 1e6:.0f} "
                      f"({rss.before / 1e6:.0f}) | {equal}/{len(reference)}, max abs diff "
                      f"{int(np.abs(frames.astype(int) - reference.astype(int)).max())} |")
                if workers > 1:
                    tables.append((workers, answer["processing_info"]))
            for workers, info in tables:
                print(f"\nworkers {workers}: timings {info['timings']}")
                print("| segment | chunks | frames | job | ran on | attempts | seconds |\n|---|---|---|---|---|---|---|")
                for segment in info["segments"]:
                    ran_on = emulator.jobs.get(segment["job_id"], {}).get("server") or "coordinator"
                    print(f"| {segment['index']} | {segment['chunks']} | {segment['frames']} | {segment['job_id']} | "
                          f"{ran_on} | {segment['attempts']} | {segment['seconds']} |")
        finally:
            emulator.close()
            for server in servers:
                server.stop()
            s3.stop()


if __name__ == "__main__":
    main()
