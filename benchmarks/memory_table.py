"""What fits on a GPU, per the memory plan's estimates (no GPU needed): the table of docs/memory.md.

    python benchmarks/memory_table.py

For each GPU size, model and output size: the longest clip the official whole-clip pass takes (at most
the plan's 121-frame cap; exact measures only: VAE slicing, DiT offload), and the plan chosen for a long
clip (chunk length, DiT offload, VAE tiles).
The budget is what `available_memory` would report on an idle card: 90% of (size - 1 GiB for the CUDA
context) plus the model's weights, which live on the card. Re-run it after calibrating the constants
in seedvr/engine/memory_plan.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seedvr.engine.memory_plan import GIB, HEADROOM, Footprint, Wishes, candidates, choose, estimate, max_chunk_frames  # noqa: E402

GPUS_GB = (24, 48, 80)
OUTPUTS = {"480p (848x480)": (480, 848), "720p (1280x720)": (720, 1280), "1080p (1920x1072)": (1072, 1920)}
LONG_CLIP = 1000  # frames


def budget(gpu_gb: int, footprint: Footprint) -> int:
    card = gpu_gb * 10**9  # marketed sizes are decimal
    return int(HEADROOM * (card - GIB - footprint.weights_bytes)) + footprint.weights_bytes


def longest_whole_clip(footprint: Footprint, memory: int, size) -> int:
    """Frames of the longest clip whose single pass fits with exact measures only (VAE slicing, DiT offload;
    no tiles); 0: none."""
    best = 0
    for frames in range(1, max_chunk_frames() + 1, 4):
        whole = [plan for plan in candidates(frames, size, Wishes(vae_tiling=False))
                 if plan.chunk_frames is None]
        if any(estimate(plan, footprint, frames, size, size).peak <= memory for plan in whole):
            best = frames
    return best


def describe_long(footprint: Footprint, memory: int, size) -> str:
    plan, guess = choose(footprint, memory, LONG_CLIP, size, size)
    if guess.peak > memory:
        return "does not fit"
    parts = [f"{plan.chunk_frames}-frame chunks"]
    if plan.dit_offload:
        parts.append("DiT offload")
    if plan.vae_tile is not None:
        parts.append(f"VAE tiles {plan.vae_tile}")
    return ", ".join(parts) + f" (~{guess.peak / GIB:.0f} GiB)"


def main() -> None:
    print("| GPU | model | output | official whole-clip pass | long clip (1000 frames) |")
    print("|---|---|---|---|---|")
    for gpu in GPUS_GB:
        for model_type in ("seedvr2_3b", "seedvr2_7b"):
            footprint = Footprint.full_size(model_type)
            memory = budget(gpu, footprint)
            for name, size in OUTPUTS.items():
                frames = longest_whole_clip(footprint, memory, size)
                whole = f"up to {frames} frames" if frames > 1 else ("1 frame (image)" if frames else "no")
                print(f"| {gpu} GB | {model_type.removeprefix('seedvr2_').upper()} | {name} | {whole} "
                      f"| {describe_long(footprint, memory, size)} |")


if __name__ == "__main__":
    main()
