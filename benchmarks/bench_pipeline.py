"""Seconds per frame of the one-step pipeline, split by phase.

    python benchmarks/bench_pipeline.py                      # tiny random-weight 3B and 7B on this machine's CPU
    python benchmarks/bench_pipeline.py --full --device cuda # full-size models (random weights) on a GPU

Random weights: the speed of a forward pass does not depend on the values, but the inputs are real frames
(a moving test pattern), never zeros. Each configuration runs once to warm up, then `--repeats` times; the
table shows the median. Prints a markdown table for BENCHMARKS.md.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from seedvr.engine.loader import build_models, compute_dtype
from seedvr.engine.pipeline import SeedVR2
from seedvr.tools import tiny

PHASES = ("preprocess", "vae_encode", "dit", "vae_decode", "postprocess")


def moving_pattern(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (frames, height, width, 3): gradients and a square that moves, so no two frames are equal."""
    y, x = np.mgrid[0:height, 0:width]
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        clip[index, ..., 0] = (x * 255 // max(width - 1, 1) + 7 * index) % 256
        clip[index, ..., 1] = (y * 255 // max(height - 1, 1)) % 256
        clip[index, ..., 2] = ((x + y + 13 * index) % 64) * 4
        top, left = (5 * index) % max(height - 16, 1), (9 * index) % max(width - 16, 1)
        clip[index, top:top + 16, left:left + 16] = 255
    return clip


def build(size: str, full: bool, device: torch.device) -> SeedVR2:
    config = OmegaConf.load(Path(__file__).resolve().parent.parent / f"configs_{size}" / "main.yaml") if full \
        else tiny.tiny_config(size)
    dtype = compute_dtype(device)
    generator = torch.Generator().manual_seed(0)
    dit, vae = build_models(f"seedvr2_{size}", config, device="cpu")
    tiny.randomise(dit, generator)
    tiny.randomise(vae, generator)
    dit.eval().to(device)
    if dtype != torch.float32:
        dit.to_compute_dtype(dtype)
    vae.eval().to(device, dtype)
    txt_in_dim = config.dit.kwargs.txt_in_dim
    positive = torch.randn(tiny.POSITIVE_TOKENS, txt_in_dim, generator=generator)
    negative = torch.randn(tiny.NEGATIVE_TOKENS, txt_in_dim, generator=generator)
    return SeedVR2(dit, vae, positive, negative, device=device, dtype=dtype)


def measure(pipeline: SeedVR2, clip: np.ndarray, res_h: int, res_w: int, repeats: int) -> dict:
    runs = []
    for run in range(repeats + 1):
        timings = {}
        if pipeline.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        pipeline.restore(clip, res_h=res_h, res_w=res_w, timings=timings)
        timings["total"] = time.perf_counter() - started
        if run:  # the first run warms up
            runs.append(timings)
    result = {name: statistics.median(run[name] for run in runs) for name in (*PHASES, "total")}
    if pipeline.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size models instead of the tiny ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["3b", "7b"])
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--sizes", nargs="+", default=["854x480"] if not torch.cuda.is_available() else
                        ["854x480", "1280x720", "1920x1080"], help="output WIDTHxHEIGHT (the input is half of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f", torch {torch.__version__}, {torch.get_num_threads()} threads, {'full-size' if args.full else 'tiny'} "
          f"models, {args.frames} frames, median of {args.repeats}")
    header = "| model | output | s/frame | " + " | ".join(PHASES) + " | peak VRAM GiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.models:
        pipeline = build(size, args.full, device)
        for output in args.sizes:
            width, height = map(int, output.split("x"))
            clip = moving_pattern(args.frames, height // 2, width // 2)
            result = measure(pipeline, clip, height, width, args.repeats)
            split = " | ".join(f"{result[name]:.3f}" for name in PHASES)
            peak = f"{result['peak_gib']:.1f}" if "peak_gib" in result else "n/a"
            print(f"| {size.upper()} | {output} | {result['total'] / args.frames:.4f} | {split} | {peak} |")
        del pipeline


if __name__ == "__main__":
    main()
