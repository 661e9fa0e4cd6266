"""Measure the working-set constants of seedvr/engine/memory_plan.py on this machine.

    python benchmarks/calibrate_memory.py            # every part, prints a markdown table
    python benchmarks/calibrate_memory.py --part vae_decode

Each measurement runs in a fresh subprocess on the full-width architectures (the DiTs cut to 2 blocks,
the real VAE), with random weights, at two sizes; the constant is the slope between them, so weights,
the CUDA context and the interpreter cancel out:

    DiT      bytes per video token (after 1x2x2 patching), per unit of model width
    VAE      bytes per output pixel and frame in flight (one temporal slice), per unit of block_out_channels[0]

On CUDA the peak is torch.cuda.max_memory_allocated (bf16, as the worker runs); on CPU it is the growth of
the peak RSS (float32, about twice the bf16 figure, see docs/memory.md). Paste the printed values into
memory_plan.py's constants when calibrating on a GPU.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from seedvr.models.dit3b import NaDiT3B  # noqa: E402
from seedvr.models.dit7b import NaDiT7B  # noqa: E402
from seedvr.models.vae import VideoAutoencoder  # noqa: E402

# part -> the two sizes measured: DiT latent grids (t, h, w); VAE (frames, height, width)
SIZES = {
    "dit3b": ((2, 32, 32), (2, 64, 64)),
    "dit7b": ((2, 32, 32), (2, 64, 64)),
    "vae_encode": ((5, 64, 64), (5, 128, 128)),
    "vae_decode": ((5, 64, 64), (5, 128, 128)),
}
TEXT_TOKENS = 58


def _kwargs(size: str, section: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO_ROOT / f"configs_{size}" / "main.yaml")[section].kwargs)


def _materialise(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module = module.to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(part: str, size: tuple[int, int, int]) -> dict:
    """Peak bytes of one call, above what was held before it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        if part.startswith("dit"):
            model_size = part.removeprefix("dit")
            kwargs = _kwargs(model_size, "dit") | {"num_layers": 2}
            kwargs |= {"mm_layers": 1} if model_size == "3b" else {}
            model = (NaDiT3B if model_size == "3b" else NaDiT7B)(**kwargs)
        else:
            model = VideoAutoencoder(**_kwargs("3b", "vae"))
    model = _materialise(model, device)
    if part.startswith("dit") and dtype != torch.float32:
        model.to_compute_dtype(dtype)
    elif dtype != torch.float32:
        model.to(dtype)
    first, second, third = size
    with torch.inference_mode():
        if part.startswith("dit"):
            inputs = dict(vid=torch.randn(first * second * third, 33, device=device),
                          txt=torch.randn(TEXT_TOKENS, model.txt_in.in_features, device=device),
                          vid_shape=torch.tensor([size], device=device),
                          txt_shape=torch.tensor([[TEXT_TOKENS]], device=device),
                          timestep=torch.tensor([1000.0], device=device))
            call, units = (lambda: model(**inputs)), first * second * third // 4  # patch tokens
        elif part == "vae_encode":
            video = torch.randn(1, 3, first, second, third, device=device, dtype=dtype)
            call, units = (lambda: model.encode(video)), first * second * third
        else:
            latent = torch.randn(1, 16, (first - 1) // 4 + 1, second // 8, third // 8, device=device, dtype=dtype)
            call, units = (lambda: model.decode(latent)), first * second * third
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else _peak_bytes(device)
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = _peak_bytes(device) - before
    return {"part": part, "size": list(size), "units": units, "peak_bytes": peak, "device": device.type}


def calibrate(part: str) -> dict:
    results = []
    for size in SIZES[part]:
        command = [sys.executable, __file__, "--measure", part, "--size", ",".join(map(str, size))]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    small, large = results
    per_unit = (large["peak_bytes"] - small["peak_bytes"]) / (large["units"] - small["units"])
    width = {"dit3b": 2560, "dit7b": 3072}.get(part, 128)  # model width / block_out_channels[0]
    return {"part": part, "device": small["device"], "bytes_per_unit": per_unit, "per_width": per_unit / width,
            "measurements": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=tuple(SIZES), action="append")
    parser.add_argument("--measure", choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, tuple(int(v) for v in args.size.split(",")))))
        return
    print("| part | device | bytes per unit | per unit of width | peaks measured (bytes) |")
    print("|---|---|---|---|---|")
    for part in args.part or SIZES:
        result = calibrate(part)
        peaks = ", ".join(f"{m['size']}: {m['peak_bytes']}" for m in result["measurements"])
        print(f"| {part} | {result['device']} | {result['bytes_per_unit']:.0f} | {result['per_width']:.2f} | {peaks} |")


if __name__ == "__main__":
    main()
