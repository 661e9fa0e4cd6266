"""The memory plan: how one clip is cut and where the weights live, chosen from the memory that is free.

A plan fixes the temporal chunk length (None: the whole clip in one pass, the official behaviour), the
VAE's exact temporal slicing and conv splitting, the opt-in (approximate) spatial VAE tiles, and DiT
block offload. `choose` walks the candidate plans from best to cheapest and takes the first whose
estimated peak fits the budget:

    passes:  chunks of at least PREFERRED_MIN_CHUNK frames first, then shorter ones
    modes:   nothing -> DiT offload (exact) -> VAE tiles 512 px -> 512 + offload -> 256 -> 256 + offload
    chunks:  whole clip (when f <= max_chunk_frames), then 121, 97, ..., 5 frames
    VAE:     one pass over a chunk when it fits, else the official 4-frame slices

`smaller` is the retry after a CUDA out-of-memory error: the first candidate whose estimate is at most
RETRY_SHRINK times the failed one's (the failure proves the estimate was short by at least that much).
The request's memory options (`Wishes`) pin their part of the plan on every attempt.

Estimates (bytes) per phase, for a chunk of n frames padded to n_pad = 4k + 1, output Hc x Wc = P pixels
(tiled: P_tile pixels per tile), l = t·(Hc/16)·(Wc/16) DiT tokens, activation size a (2 bf16, 4 float32):

    weights     VAE + DiT (with offload: DiT minus its blocks plus two blocks)
    preprocess  n·(15·P_in + 36·P)                 uint8 and float32 input frames, resize, crop, normalise
    vae_encode  12·n·P + (12 + 3·a)·n_pad·P + VAE_ENCODE·c0·a·P_tile·(frames in flight) (+ cache, sliced)
    dit         12·n·P + DIT[arch]·D·a·l
    vae_decode  12·n·P + 3·a·n_pad·P (+ 12·n_pad·P, tiled) + VAE_DECODE·c0·a·P_tile·(in flight) (+ cache)

12·n·P is the float32 input kept for the colour fix, (12 + 3·a)·n_pad·P the padded VAE input and its cast
(no cast in float32), 3·a·n_pad·P the decoded chunk (12·n_pad·P: the tiles' float32 sum); c0 is the VAE's
first block width (128), D the DiT width. The element constants were measured on CPU in float32 with
`benchmarks/calibrate_memory.py` (full-width DiTs cut to 2 blocks, the real VAE, random weights; the
growth of the peak RSS with the size, divided by 4 bytes) and are applied with a = 2 on a GPU, which
assumes bf16 halves every activation: an estimate, to be re-measured on a GPU (docs/memory.md).

Tests inject a device: the setting SEEDVR_TEST_MEMORY_BUDGET_BYTES replaces the free memory, and `check_simulated`
raises a genuine torch.OutOfMemoryError when a phase's planned working set, times
SEEDVR_TEST_MEMORY_SCALE (default 1: a device that needs exactly the estimate), exceeds it.
"""

import ctypes
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import product
from typing import TYPE_CHECKING

import psutil
import torch

from seedvr import settings
from seedvr.engine.preprocess import CROP_MULTIPLE, VAE_TEMPORAL_STRIDE, padded_frame_count
from seedvr.models.registry import VAE_BYTES, VAE_WIDTH, ModelCard, card, card_of

if TYPE_CHECKING:
    from seedvr.engine.restorer import Restorer
    from seedvr.models.dit_base import NaDiTBase
    from seedvr.models.vae import VideoAutoencoder

GIB = 1024**3

# Chunking. 121 frames = 31 latent frames: the DiT's temporal windows are at most ceil(30 / 4) = 8 latent
# frames long for any clip of 29 latent frames or more, so a longer single pass adds no attention
# context; beyond it the clip is chunked even when it would fit, which also bounds host memory. The setting
# SEEDVR_MAX_CHUNK_FRAMES (default settings.DEFAULT_MAX_CHUNK_FRAMES = 121) moves that limit.
CHUNK_LENGTHS = (121, 97, 81, 61, 49, 41, 33, 25, 21, 17, 13, 9, 5)  # 4n + 1, longest first
PREFERRED_MIN_CHUNK = 21  # shorter chunks only after offload and tiling
MAX_AUTO_OVERLAP = 9

# VAE
OFFICIAL_VAE_SLICE = 4  # frames per temporal slice (the official slicing_sample_min_size)
TILE_SIZES = (512, 256)  # output pixels per tile side, tried in this order when tiling is automatic
CONV_MAX_BYTES = GIB // 2  # the official conv split limit
TILED_CONV_MAX_BYTES = GIB // 8  # with tiles: the memory is short, split convs more finely

# Working-set constants, in activation elements (see the module docstring for the derivation); the DiT's
# per-token constant is its card's `dit_elements_per_token` (seedvr.models.registry)
VAE_ENCODE_PER_FRAME, VAE_ENCODE_CACHE = 11.5, 20.0  # per output pixel per channel of c0
VAE_DECODE_PER_FRAME, VAE_DECODE_CACHE = 18.0, 40.0
PREPROCESS_BYTES_PER_INPUT_PIXEL, PREPROCESS_BYTES_PER_OUTPUT_PIXEL = 15, 36
FLOAT32_VIDEO_BYTES_PER_PIXEL = 12  # (3, n, Hc, Wc) float32

HEADROOM = 0.9  # of the free memory (allocator fragmentation, what the estimates miss)
RETRY_SHRINK = 0.7
MAX_RETRIES = 6


Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class Footprint:
    """What the estimates need to know about a loaded model."""

    dit_elements_per_token: float  # the DiT architecture's activation constant (its registry card)
    dit_width: int
    dit_blocks_bytes: int  # all transformer blocks
    dit_block_bytes: int  # the largest block
    dit_other_bytes: int  # embeddings and output head
    vae_bytes: int
    vae_width: int  # channels of the VAE's full-resolution stage (block_out_channels[0])
    activation_bytes: int  # 2 (bf16, CUDA) or 4 (float32, CPU)

    @classmethod
    def full_size(cls, model_type: str) -> "Footprint":
        """The released model on a GPU (bf16 Linear weights, float32 norms; from the official manifests)."""
        model: ModelCard = card(model_type)
        size = model.full_size
        return cls(model.dit_elements_per_token, model.dit_width, size.dit_blocks, size.dit_block, size.dit_other,
                   vae_bytes=VAE_BYTES, vae_width=VAE_WIDTH, activation_bytes=2)

    @property
    def weights_bytes(self) -> int:
        return self.dit_blocks_bytes + self.dit_other_bytes + self.vae_bytes


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def measure_footprint(dit: "NaDiTBase", vae: "VideoAutoencoder", dtype: torch.dtype) -> Footprint:
    """The footprint of a loaded DiT and VAE computing in `dtype`."""
    blocks = [_tensor_bytes(block) for block in dit.blocks]
    return Footprint(card_of(dit).dit_elements_per_token, dit.width, sum(blocks), max(blocks),
                     _tensor_bytes(dit) - sum(blocks), _tensor_bytes(vae), vae.width, torch.finfo(dtype).bits // 8)


def resident_bytes(modules: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Bytes of the modules' tensors held on `device`'s kind of memory (reusable by a job's plan)."""
    tensors = [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


@dataclass(frozen=True)
class MemoryPlan:
    chunk_frames: int | None  # None: the whole clip in one pass (official)
    chunk_overlap: int
    vae_temporal_chunk: int | None  # frames per exact VAE slice; None: one pass over the chunk
    vae_conv_max_bytes: int  # larger conv inputs are split along H (exact)
    vae_tile: int | None  # spatial tile side in output pixels (approximate); None: whole frames
    dit_offload: bool  # DiT blocks in host memory, each moved to the GPU for its turn (exact)

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    weights: int
    phases: dict  # phase name -> activation bytes on top of the weights

    @property
    def peak(self) -> int:
        return self.weights + max(self.phases.values())

    def at(self, phase: str) -> int:
        return self.weights + self.phases.get(phase, 0)


@dataclass(frozen=True)
class Wishes:
    """The request's memory options; None leaves the choice to the plan."""

    chunk_frames: int | None = None
    chunk_overlap: int | None = None
    vae_tiling: bool | None = None
    vae_tile_size: int | None = None
    dit_offload: bool | None = None


def max_chunk_frames() -> int:
    """The longest pass the plan makes on its own (setting SEEDVR_MAX_CHUNK_FRAMES, 4n + 1, default 121)."""
    return settings.current().max_chunk_frames


def auto_overlap(chunk_frames: int) -> int:
    """About a quarter of the chunk, at most MAX_AUTO_OVERLAP, and ≡ 1 mod 4 so that the latent grids of
    neighbouring chunks line up (see seedvr.engine.chunking)."""
    return min(MAX_AUTO_OVERLAP, (chunk_frames // 4 - 1) // 4 * 4 + 1)


def tile_overlap(tile: int) -> int:
    """Pixels shared by neighbouring VAE tiles: an eighth of the tile, a multiple of 8."""
    return max(8, tile // 64 * 8)


def estimate(plan: MemoryPlan, footprint: Footprint, frames: int, input_size: tuple[int, int],
             output_size: tuple[int, int]) -> Estimate:
    """Bytes the plan needs for a clip of `frames` frames (see the module docstring)."""
    n = frames if plan.chunk_frames is None else min(plan.chunk_frames, frames)
    n_pad = padded_frame_count(n)
    (in_h, in_w), (out_h, out_w) = input_size, output_size
    pixels = out_h * out_w
    act = footprint.activation_bytes
    tile_pixels = pixels if plan.vae_tile is None else min(out_h, plan.vae_tile) * min(out_w, plan.vae_tile)
    in_flight = n_pad if plan.vae_temporal_chunk is None else min(n_pad, 1 + plan.vae_temporal_chunk)
    sliced = in_flight < n_pad
    vae_scale = footprint.vae_width * act * tile_pixels
    latent_frames = (n_pad - 1) // VAE_TEMPORAL_STRIDE + 1
    tokens = latent_frames * math.ceil(out_h / CROP_MULTIPLE) * math.ceil(out_w / CROP_MULTIPLE)
    video = FLOAT32_VIDEO_BYTES_PER_PIXEL * n * pixels
    dit_elements = footprint.dit_elements_per_token
    tiled_output = FLOAT32_VIDEO_BYTES_PER_PIXEL * n_pad * pixels if plan.vae_tile is not None else 0
    phases = {
        "preprocess": n * (PREPROCESS_BYTES_PER_INPUT_PIXEL * in_h * in_w + PREPROCESS_BYTES_PER_OUTPUT_PIXEL * pixels),
        "vae_encode": video + (FLOAT32_VIDEO_BYTES_PER_PIXEL + (3 * act if act != 4 else 0)) * n_pad * pixels
        + int(vae_scale * (VAE_ENCODE_PER_FRAME * in_flight + (VAE_ENCODE_CACHE if sliced else 0))),
        "dit": video + int(dit_elements * footprint.dit_width * act * tokens),
        "vae_decode": video + 3 * act * n_pad * pixels + tiled_output
        + int(vae_scale * (VAE_DECODE_PER_FRAME * in_flight + (VAE_DECODE_CACHE if sliced else 0))),
    }
    dit_blocks = 2 * footprint.dit_block_bytes if plan.dit_offload else footprint.dit_blocks_bytes
    return Estimate(footprint.vae_bytes + footprint.dit_other_bytes + dit_blocks, phases)


def candidates(frames: int, output_size: Size, wishes: Wishes, max_chunk: int | None = None) -> Iterator[MemoryPlan]:
    """Every plan the wishes allow, best first (see the module docstring)."""
    max_chunk = max_chunk_frames() if max_chunk is None else max_chunk
    if wishes.chunk_frames is not None:
        chunks: list[int | None] = [None if wishes.chunk_frames >= frames else wishes.chunk_frames]
    else:
        shortest = (wishes.chunk_overlap or 0) + 1
        lengths = sorted({*CHUNK_LENGTHS, max_chunk}, reverse=True)
        chunks = ([None] if frames <= max_chunk else []) + [
            length for length in lengths if shortest <= length < frames and length <= max_chunk]
        chunks = chunks or [VAE_TEMPORAL_STRIDE * math.ceil((shortest - 1) / VAE_TEMPORAL_STRIDE) + 1]
    tiles: list[int | None]
    if wishes.vae_tile_size is not None:
        tiles = [wishes.vae_tile_size]
    else:
        tilings: dict[bool | None, list[int | None]] = {True: [*TILE_SIZES], False: [None], None: [None, *TILE_SIZES]}
        tiles = tilings[wishes.vae_tiling]
    tiles = [tile for tile in tiles if tile is None or tile < max(output_size)] or [None]
    offloads = [False, True] if wishes.dit_offload is None else [wishes.dit_offload]
    slicings = [None, OFFICIAL_VAE_SLICE] if frames > 1 else [None]
    for short_pass in (False, True):
        for tile, offload in product(tiles, offloads):
            for chunk in chunks:
                if (chunk is not None and chunk < PREFERRED_MIN_CHUNK) != short_pass:
                    continue
                for slicing in slicings:
                    overlap = 0 if chunk is None else (wishes.chunk_overlap if wishes.chunk_overlap is not None
                                                       else auto_overlap(chunk))
                    yield MemoryPlan(chunk, overlap, slicing, CONV_MAX_BYTES if tile is None else TILED_CONV_MAX_BYTES,
                                     tile, offload)


def choose(footprint: Footprint, budget: int, frames: int, input_size: Size, output_size: Size,
           wishes: Wishes = Wishes()) -> tuple[MemoryPlan, Estimate]:
    """The best plan whose estimate fits `budget` bytes, or the one needing least when none does."""
    smallest: tuple[MemoryPlan, Estimate] | None = None
    for plan in candidates(frames, output_size, wishes):
        guess = estimate(plan, footprint, frames, input_size, output_size)
        if guess.peak <= budget:
            return plan, guess
        if smallest is None or guess.peak < smallest[1].peak:
            smallest = (plan, guess)
    assert smallest is not None, "every request has at least one candidate plan"
    return smallest


def smaller(failed: Estimate, footprint: Footprint, budget: int, frames: int, input_size: Size, output_size: Size,
            wishes: Wishes = Wishes()) -> tuple[MemoryPlan, Estimate] | None:
    """The plan to retry with after `failed` ran out of memory, or None when no candidate needs less."""
    target = min(budget, int(failed.peak * RETRY_SHRINK))
    for plan in candidates(frames, output_size, wishes):
        guess = estimate(plan, footprint, frames, input_size, output_size)
        if guess.peak <= target:
            return plan, guess
    return None


def largest_fitting_size(footprint: Footprint, target: int, frames: int, input_size: Size, output_size: Size,
                         wishes: Wishes = Wishes()) -> tuple[int, int] | None:
    """The largest (Hc, Wc) with the aspect of `output_size`, multiples of 16, that some allowed plan fits
    in `target` bytes; None when not even 16x16 does."""
    out_h, out_w = output_size

    def size_at(scale: float) -> tuple[int, int]:
        return (max(CROP_MULTIPLE, int(out_h * scale) // CROP_MULTIPLE * CROP_MULTIPLE),
                max(CROP_MULTIPLE, int(out_w * scale) // CROP_MULTIPLE * CROP_MULTIPLE))

    def fits(size: tuple[int, int]) -> bool:
        return any(estimate(plan, footprint, frames, input_size, size).peak <= target
                   for plan in candidates(frames, size, wishes))

    low, high = 0.0, 1.0  # fits(size_at(low)) is checked below; size_at(1.0) is the size that failed
    if not fits(size_at(low)):
        return None
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(size_at(middle)) else (low, middle)
    return size_at(low)


def available_memory(restorer: "Restorer") -> int:
    """Bytes a job may plan with: its device's free memory (less HEADROOM) plus the weights it holds there;
    the test budget when one is injected."""
    injected = test_budget()
    if injected is not None:
        return injected
    device = restorer.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = psutil.virtual_memory().available
    return int(HEADROOM * free) + restorer.resident_weight_bytes()


def test_budget() -> int | None:
    """The simulated device size the tests set (setting SEEDVR_TEST_MEMORY_BUDGET_BYTES), or None."""
    return settings.current().test_memory_budget_bytes


def check_simulated(guess: Estimate, phase: str) -> None:
    """With a test budget set: a genuine torch.OutOfMemoryError when the phase would not fit in it."""
    budget = test_budget()
    if budget is None:
        return
    needed = guess.at(phase) * settings.current().test_memory_scale
    if needed > budget:
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (simulated by SEEDVR_TEST_MEMORY_BUDGET_BYTES): {phase} needs {needed / GIB:.3f} GiB, "
            f"the device holds {budget / GIB:.3f} GiB")


def out_of_memory_message(footprint: Footprint, budget: int, failed: Estimate, frames: int, input_size: Size,
                          output_size: Size, wishes: Wishes = Wishes(), on_gpu: bool = True) -> str:
    """What to tell a client whose clip ran out of memory with the smallest plan left: the largest output
    size that should fit, judged with the estimates shrunk as a retry would shrink them."""
    where = "on this GPU" if on_gpu else "in this machine's memory"
    target = min(budget, int(failed.peak * RETRY_SHRINK))
    fitting = largest_fitting_size(footprint, target, frames, input_size, output_size, wishes)
    out_h, out_w = output_size
    message = f"a {out_w}x{out_h} output of {frames} frame{'s' if frames > 1 else ''} does not fit {where} " \
              f"even with the smallest memory plan"
    pinned = [name for name, value in asdict(wishes).items() if value is not None]
    if pinned:
        message += f" that the request's {', '.join(pinned)} allow (leave them out to let the worker choose)"
    if fitting is None:
        return f"{message}; the model alone needs about {footprint.weights_bytes / GIB:.1f} GiB of the " \
               f"{budget / GIB:.1f} GiB available: use seedvr2_3b or a larger GPU"
    fit_h, fit_w = fitting
    return f"{message}; at most {fit_w}x{fit_h} for {frames} frame{'s' if frames > 1 else ''} fits {where}: " \
           f"lower res_h/res_w or scale"


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_host_memory() -> None:
    """Give the freed parts of the C heap back to the system (glibc malloc_trim; nothing elsewhere).

    Each chunk allocates and frees large frame buffers; glibc raises its mmap threshold after such frees
    and serves later ones from the heap, whose freed pages otherwise stay resident, so a long clip's RSS
    would creep up chunk after chunk (measured: +10 MB a chunk at 256x256 without this)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
