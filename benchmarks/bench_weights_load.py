"""Load time of the official .pth checkpoints against the bf16 .safetensors that `python -m seedvr.weights convert`
writes.

    python benchmarks/bench_weights_load.py [--dit-layers 4] [--runs 7] [--dir /tmp/seedvr-bench]

Random weights at real widths: the full-size VAE and a DiT of 3B width with few layers (the whole 3B
is 32 layers, 13.6 GB). One load = read the file, strict load into the model built on the meta device,
cast to the GPU dtype policy (DiT: Linear bf16, the rest fp32; VAE: bf16), and copy every tensor out of
the file's memory map (what the copy to the GPU does). The page cache is warm (one untimed load first), so the
numbers measure deserialising and casting; on a cold network volume the read itself dominates,
and it scales with the file size printed.
Prints markdown table rows: median (min-max) of the runs.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from seedvr.engine import loader
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.models.vae import convert_legacy_vae_keys
from seedvr.tools import weights


def random_state_dict(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 random tensors with the model's keys and shapes, as the official checkpoints store them."""
    return {key: torch.randn(tensor.shape, generator=generator) for key, tensor in model.state_dict().items()}


def load(path: Path, model: torch.nn.Module, kind: str) -> list[torch.Tensor]:
    state_dict = read_state_dict(path)
    if kind == "dit":
        model = load_strict(model, state_dict, path).to_compute_dtype(torch.bfloat16)
    else:
        model = load_strict(model, convert_legacy_vae_keys(state_dict), path).to(torch.bfloat16)
    # Both readers map the file: copy every tensor out, as .to("cuda") would, so that every byte is read.
    return [tensor.clone() for tensor in model.state_dict().values()]


def load_seconds(path: Path, config, kind: str, runs: int) -> list[float]:
    times = []
    for run in range(runs + 1):  # the first run warms the page cache and is not counted
        model = loader.build_models("seedvr2_3b", config)[kind == "vae"]  # built outside the timing: the same for both formats
        started = time.perf_counter()
        load(path, model, kind)
        if run:
            times.append(time.perf_counter() - started)
    return times


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit-layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    config = loader.load_config("seedvr2_3b")
    config.dit.kwargs.num_layers = args.dit_layers
    config.dit.kwargs.mm_layers = min(config.dit.kwargs.mm_layers, args.dit_layers // 2)
    generator = torch.Generator().manual_seed(0)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for kind, model in zip(("dit", "vae"), loader.build_models("seedvr2_3b", config)):
            state_dict = random_state_dict(model, generator)
            pth, converted = Path(tmp) / f"{kind}.pth", Path(tmp) / f"{kind}.safetensors"
            torch.save(state_dict, pth)
            weights.write_safetensors(converted, state_dict, weights.converted_dtypes(model, state_dict), {})
            params = sum(tensor.numel() for tensor in state_dict.values())
            del state_dict
            pth_s = load_seconds(pth, config, kind, args.runs)
            converted_s = load_seconds(converted, config, kind, args.runs)
            name = f"DiT 3B width, {args.dit_layers} layers" if kind == "dit" else "VAE (full size)"
            speedup = statistics.median(pth_s) / statistics.median(converted_s)
            rows.append(f"| {name} | {params / 1e6:.0f} M | {pth.stat().st_size / 1e9:.2f} GB | {spread(pth_s)} "
                        f"| {converted.stat().st_size / 1e9:.2f} GB | {spread(converted_s)} | {speedup:.2f}x |")

    print(f"weights load, warm page cache, median (min-max) of {args.runs} runs: "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| checkpoint | params | .pth (fp32) | load .pth | .safetensors (bf16) | load .safetensors | speed-up |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
