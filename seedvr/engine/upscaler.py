"""Classic single-image super-resolution models as a `Restorer`: any architecture spandrel's core package
loads (ESRGAN and Real-ESRGAN, Real-ESRGAN Compact, SPAN, SwinIR, HAT, DAT, OmniSR, ...), from
SEEDVR_CKPT_DIR/upscalers/NAME.pth or NAME.safetensors.

    upscaler = load_upscaler("4x-UltraSharp", find_upscaler("4x-UltraSharp"), torch.device("cuda"))
    restored = upscaler.restore(frames, res_h=2160, res_w=3840)  # uint8 (f, H, W, 3) -> (f, Hc, Wc, 3)

Each frame on its own: uint8 -> [0, 1] -> the network at its fixed factor s (in tiles when the frame is
large) -> antialiased bicubic resize to the size SeedVR2 would output for the same res_h x res_w (the area,
aspect kept: seedvr.engine.preprocess.resized_size), centre crop to multiples of 16 -> uint8. The frames thus
have exactly the item's size (seedvr.engine.sizing), and sizing, chunking, decoding, encoding, audio, alpha and
delivery are the SeedVR2 path's, unchanged.

What the `Restorer` protocol asks that only SeedVR2 has, and what an upscaler answers:
    latent_shape    no latent: an empty grid, so chunking's position-keyed noise draws nothing
    footprint       no DiT and no VAE: the network's weights stand in the VAE's place, so the memory plan counts
                    them and the chunk's frame buffers (its pixel terms); the activations are bounded by the tiles.
                    A clip is chunked as any is (past SEEDVR_MAX_CHUNK_FRAMES): the frames two chunks share are
                    upscaled twice, to the same result, so their cross-fade changes nothing (about 8% more work)
    apply_plan      a new item: the tiles start again at their default side
    attention       "native", the architecture's own (spandrel's code; our backends do not apply)
    compiled        the whole network, torch.compile'd (dynamic shapes)
    sampling        not used (the schema refuses SeedVR2's sampling fields with model_type "upscaler")

Tiles. A frame whose sides exceed the tile side is cut into tiles of that side (input pixels), each run with
TILE_CONTEXT pixels of its neighbours around it, whose output is cropped away: exact for a network whose
receptive field is within the context (convolutional ones such as Compact and SPAN nearly are), a close
approximation otherwise. spandrel's ModelTiling decides: SUPPORTED models tile above DEFAULT_TILE_SIDE,
DISCOURAGED ones (global context: SwinIR, SCUNet) and INTERNAL ones (which tile themselves) run whole frames
until the memory runs out. A CUDA out-of-memory error in a frame halves the tile side (down to MIN_TILE_SIDE)
and runs the frame again; the side stays halved for the rest of the item. spandrel pads a tile to the model's
size requirements (multiple_of, minimum, square) and crops the padding away. The time goes to the item's
timings as "upscale".

Precision: on CUDA fp16 when spandrel says the architecture supports it, else bf16 when it does, else float32;
float32 on CPU.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from seedvr import settings
from seedvr.engine.memory_plan import Footprint, MemoryPlan, resident_bytes
from seedvr.engine.preprocess import center_crop, resized_size
from seedvr.engine.restorer import Frames, LatentShape, RestoreInterrupted, Sampling
from seedvr.errors import CheckpointError

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

log = logging.getLogger(__name__)

UPSCALER = "upscaler"  # the model_type of a request that runs one
UPSCALER_FOLDER = "upscalers"  # under SEEDVR_CKPT_DIR
UPSCALER_SUFFIXES = (".safetensors", ".pth")  # preferred first when a name has both
PURPOSES = ("SR", "Restoration")  # spandrel's purposes we run: not FaceSR (aligned faces), not Inpainting
RGB_CHANNELS = 3
DEFAULT_TILE_SIDE = 512  # input pixels: a 4x network's tile is 2048 px at its output
MIN_TILE_SIDE = 64
TILE_CONTEXT = 32  # input pixels of the neighbours each tile sees on every side
UINT8_MAX = 255.0


def upscaler_folder() -> Path:
    return settings.current().ckpt_dir / UPSCALER_FOLDER


def available_upscalers(folder: Path | None = None) -> dict[str, Path]:
    """{name: file} of the upscalers present (the file's stem is the name; .safetensors wins over .pth)."""
    folder = upscaler_folder() if folder is None else folder
    if not folder.is_dir():
        return {}
    files = [path for path in folder.iterdir() if path.suffix in UPSCALER_SUFFIXES and path.is_file()]
    found: dict[str, Path] = {}
    for path in sorted(files, key=lambda path: (path.stem, UPSCALER_SUFFIXES.index(path.suffix))):
        found.setdefault(path.stem, path)
    return found


def absent_upscaler(name: str, field: str) -> str | None:
    """Why `name` (sent in `field`) names no upscaler present, listing those that are; None when it is present."""
    present = available_upscalers()
    if name in present:
        return None
    if not present:
        return (f"{field} {name!r}: no upscaler is present; the worker loads NAME.pth or NAME.safetensors "
                f"(a model spandrel supports) from {upscaler_folder()}")
    return f"{field} {name!r} is not present; the upscalers present are {', '.join(sorted(present))}"


def find_upscaler(name: str) -> Path:
    """The file of upscaler `name`, or CheckpointError (MODEL_NOT_AVAILABLE) listing those present."""
    path = available_upscalers().get(name)
    if path is None:
        raise CheckpointError(absent_upscaler(name, "upscaler") or name)
    return path


def upscaler_dtype(descriptor: "ImageModelDescriptor", device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    if descriptor.supports_half:
        return torch.float16
    return torch.bfloat16 if descriptor.supports_bfloat16 else torch.float32


def load_upscaler(name: str, path: Path, device: torch.device) -> "Upscaler":
    """The upscaler in `path`, on `device` in its compute precision; CheckpointError when spandrel cannot load
    it or it is not an RGB super-resolution or restoration model."""
    from spandrel import ImageModelDescriptor, ModelLoader  # with torchvision: 2 s, paid by the first load only

    try:
        descriptor = ModelLoader(device=device).load_from_file(path)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # spandrel and the unpickler raise many kinds, all meaning "not a model we run"
        raise CheckpointError(f"upscaler {name!r}: {path} is not a model spandrel can load "
                              f"({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose not in PURPOSES or \
            (descriptor.input_channels, descriptor.output_channels) != (RGB_CHANNELS, RGB_CHANNELS):
        raise CheckpointError(
            f"upscaler {name!r}: {path} holds a {descriptor.architecture.name} {descriptor.purpose} model with "
            f"{descriptor.input_channels} -> {descriptor.output_channels} channels; the worker runs RGB "
            f"super-resolution and restoration models ({', '.join(PURPOSES)})")
    dtype = upscaler_dtype(descriptor, device)
    descriptor.to(device, dtype).eval()
    log.info("upscaler %s: %s %dx (%s) in %s on %s", name, descriptor.architecture.name, descriptor.scale,
             ", ".join(descriptor.tags), str(dtype).removeprefix("torch."), device)
    return Upscaler(name, descriptor)


def tile_spans(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) of the tiles covering 0..length, each at most `tile` long (one span when it fits)."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


class Upscaler:
    """A spandrel model restoring clips frame by frame; a `Restorer` (see the module docstring)."""

    def __init__(self, name: str, descriptor: "ImageModelDescriptor", tile_side: int = DEFAULT_TILE_SIDE):
        from spandrel import ModelTiling

        self.name = name
        self.descriptor = descriptor
        self.default_tile_side = tile_side
        self.tiles_by_default = descriptor.tiling == ModelTiling.SUPPORTED
        self.tile_side = self._first_tile_side()
        self._compiled = False
        self._interrupted = False

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name

    @property
    def device(self) -> torch.device:
        return self.descriptor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.dtype

    @property
    def devices(self) -> tuple[str, ...]:
        return (str(self.device),)

    @property
    def random_weights(self) -> bool:
        return False  # a file someone trained (or a test's): the worker cannot tell, and claims nothing

    @property
    def attention_backend(self) -> str:
        return "native"

    def set_attention_backend(self, name: str) -> None:
        if name != "auto":
            raise ValueError(f"an upscaler runs its architecture's own attention; attention_backend {name!r} "
                             "applies to SeedVR2 only")

    @property
    def compiled(self) -> bool:
        return self._compiled

    def set_compiled(self, enabled: bool) -> None:
        """torch.compile the whole network (dynamic shapes: tiles and frames of any size), or go back to eager."""
        network = self.descriptor.model
        if enabled:
            network.compile(dynamic=True)
        else:
            network._compiled_call_impl = None  # what nn.Module.compile set: the eager call again
        self._compiled = enabled

    def latent_shape(self, frames: int, height: int, width: int) -> LatentShape:
        return LatentShape(0, 0, 0, 0)  # no latent, no noise

    def footprint(self) -> Footprint:
        return Footprint(dit_elements_per_token=0.0, dit_width=0, dit_blocks_bytes=0, dit_block_bytes=0,
                         dit_other_bytes=0, vae_bytes=self.resident_weight_bytes(), vae_width=0,
                         activation_bytes=self.dtype.itemsize)

    def resident_weight_bytes(self) -> int:
        return resident_bytes((self.descriptor.model,), self.device)

    def apply_plan(self, plan: MemoryPlan) -> None:
        """A new item: the tiles start again at their default side (the plan's chunking is chunking's)."""
        self.tile_side = self._first_tile_side()

    def interrupt(self) -> None:
        """The restore in flight raises RestoreInterrupted before its next tile."""
        self._interrupted = True

    def close(self) -> None:
        """Nothing to stop: the weights go when the last reference does."""

    def _first_tile_side(self) -> int | None:
        """None: whole frames (until the memory runs out)."""
        return self.default_tile_side if self.tiles_by_default else None

    @torch.inference_mode()
    def restore(self, frames: Frames, *, res_h: int, res_w: int, sampling: Sampling = Sampling(),
                eps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                aug_noise: torch.Tensor | None = None, clip_latent_frames: int | None = None,
                timings: dict[str, float] | None = None, stages: dict[str, torch.Tensor] | None = None,
                on_phase: Callable[[str], None] | None = None) -> torch.Tensor:
        """uint8 (f, H, W, 3) -> uint8 (f, Hc, Wc, 3) on the CPU, (Hc, Wc) = output_size(H, W, res_h, res_w).
        The diffusion arguments (sampling, eps, noise, aug_noise, clip_latent_frames, stages) do not apply."""
        if not isinstance(frames, torch.Tensor):
            frames = torch.from_numpy(np.require(frames, requirements=("C", "W")))  # copied only when read-only
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != RGB_CHANNELS or not len(frames):
            raise ValueError(f"expected uint8 frames of shape (f, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        self._interrupted = False
        if on_phase is not None:
            on_phase("upscale")
        started = time.perf_counter()
        height, width = frames.shape[1:3]
        resized = resized_size(height, width, res_h, res_w)
        restored: torch.Tensor | None = None
        for index, frame in enumerate(frames):
            image = frame.to(self.device).permute(2, 0, 1)[None].to(self.dtype) / UINT8_MAX  # (1, 3, H, W)
            upscaled = self._upscale(image)  # (1, 3, s·H, s·W) in [0, 1]
            output = F.interpolate(upscaled.float(), size=resized, mode="bicubic", align_corners=False,
                                   antialias=True) if upscaled.shape[-2:] != resized else upscaled.float()
            output = center_crop(output)[0].permute(1, 2, 0)  # (Hc, Wc, 3)
            if restored is None:
                restored = torch.empty((len(frames), *output.shape), dtype=torch.uint8)
            restored[index] = output.mul(UINT8_MAX).round_().clamp_(0, UINT8_MAX).to(torch.uint8).cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timings is not None:
            timings["upscale"] = timings.get("upscale", 0.0) + time.perf_counter() - started
        assert restored is not None, "a clip has at least one frame"
        return restored

    def _upscale(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) -> (1, 3, s·H, s·W); on CUDA out of memory, again with tiles of half the side."""
        while True:
            tile = self.tile_side
            try:
                return self._upscale_tiled(image, tile)
            except torch.OutOfMemoryError:
                if tile is not None and tile <= MIN_TILE_SIDE:
                    raise
            # the failed attempt's tensors died with the except block
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            side = max(image.shape[-2:]) if tile is None else tile
            self.tile_side = max(MIN_TILE_SIDE, side // 2)
            log.warning("upscaler %s ran out of memory with %s; tiles of %d px from now on", self.name,
                        "whole frames" if tile is None else f"tiles of {tile} px", self.tile_side)

    def _upscale_tiled(self, image: torch.Tensor, tile: int | None) -> torch.Tensor:
        height, width = image.shape[-2:]
        if tile is None or (height <= tile and width <= tile):
            self._check_interrupted()
            return self.descriptor(image)
        scale = self.scale
        output = torch.empty((1, RGB_CHANNELS, height * scale, width * scale), dtype=image.dtype, device=image.device)
        for top, bottom in tile_spans(height, tile):
            for left, right in tile_spans(width, tile):
                self._check_interrupted()
                # the tile and TILE_CONTEXT pixels around it, clipped to the frame
                y0, y1 = max(0, top - TILE_CONTEXT), min(height, bottom + TILE_CONTEXT)
                x0, x1 = max(0, left - TILE_CONTEXT), min(width, right + TILE_CONTEXT)
                upscaled = self.descriptor(image[..., y0:y1, x0:x1])
                output[..., top * scale:bottom * scale, left * scale:right * scale] = upscaled[
                    ..., (top - y0) * scale:(bottom - y0) * scale, (left - x0) * scale:(right - x0) * scale]
        return output

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise RestoreInterrupted("the restore was interrupted")
