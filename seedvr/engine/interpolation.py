"""RIFE frame interpolation: a stream of frames in, the frames at given fractional positions out.

    interpolator = RifeInterpolator(load_rife(checkpoint_path(), device))
    for frame in interpolator.frames(restored_frames, positions, is_cut):  # positions: 0, 1/2, 1, ... (Fractions)
        ...

A whole position is that source frame itself, unchanged (the same array). A fractional position i + t is the
frame IFNet draws at time t between frames i and i + 1, unless a scene cut lies between them: then the nearer
of the two is repeated (frame i at t = 1/2), so two scenes are never blended. `is_cut(frame i, frame i + 1)` is
asked once for every pair, in order (the caller's test: seedvr.io.media.interpolation.SceneCuts, the one the
ffmpeg method uses too). Positions past the last frame repeat it.

Streaming: frames are read as the positions need them and dropped once behind; the model runs on batches of up
to `batch_size` new frames, which may span several pairs, so the clip is never held. It runs where the model is
(the restorer's device), in float16 on CUDA (the warps in float32), float32 on the CPU.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from seedvr import settings
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.models.rife import RIFE_WEIGHTS, IFNet, pad_multiple

BATCH_PIXELS = 4 * 1920 * 1088  # padded pixels per model call: 4 frames of 1080p, 8 of 720p, 1 of 4K
MAX_BATCH = 8
# Frames larger than this have their flow estimated at half size, as Practical-RIFE advises for 4K (--scale 0.5):
# at full size the coarsest block's view is too fine for the motion of a large frame.
HALF_SCALE_PIXELS = 2560 * 1440


def checkpoint_path() -> Path:
    """Where the RIFE checkpoint lives: next to the SeedVR2 checkpoints (SEEDVR_CKPT_DIR)."""
    return settings.current().ckpt_dir / RIFE_WEIGHTS.filename


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_rife(path: Path, device: torch.device) -> IFNet:
    """The released IFNet read strictly from `path` (CheckpointError naming the file and the keys otherwise),
    ready on `device` in its compute dtype."""
    with torch.device("meta"):
        model = IFNet()
    load_strict(model, read_state_dict(path), path)
    return model.eval().requires_grad_(False).to(device=device, dtype=compute_dtype(device))


@dataclass
class _Frame:
    array: np.ndarray  # uint8 (h, w, 3), as it came
    tensor: torch.Tensor  # (1, 3, h_pad, w_pad) in [0, 1], the model's dtype and device


@dataclass(frozen=True)
class _Geometry:
    """How a clip's frames go through the model: the flow scale, the padded size, frames per model call."""

    scale: float
    padded: tuple[int, int]
    batch_size: int

    @classmethod
    def of(cls, height: int, width: int) -> "_Geometry":
        scale = 0.5 if height * width > HALF_SCALE_PIXELS else 1.0
        multiple = pad_multiple(scale)
        padded = (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)
        return cls(scale, padded, max(1, min(MAX_BATCH, BATCH_PIXELS // (padded[0] * padded[1]))))


class _Source:
    """The source frames that the positions still need, read on demand, and where the scene cuts are."""

    def __init__(self, frames: Iterator[np.ndarray], is_cut: Callable[[np.ndarray, np.ndarray], bool],
                 device: torch.device, dtype: torch.dtype):
        self.frames, self.is_cut, self.device, self.dtype = frames, is_cut, device, dtype
        self.geometry: _Geometry | None = None  # from the first frame
        self.loaded: dict[int, _Frame] = {}
        self.count = 0  # frames read so far
        self.ended = False
        self.cut_after: set[int] = set()  # i: a scene cut lies between frames i and i + 1

    def has(self, index: int) -> bool:
        """Whether frame `index` exists, reading up to it."""
        while self.count <= index and not self.ended:
            array = next(self.frames, None)
            if array is None:
                self.ended = True
                break
            if self.count - 1 in self.loaded and self.is_cut(self.loaded[self.count - 1].array, array):
                self.cut_after.add(self.count - 1)
            self.loaded[self.count] = self._prepare(array)
            self.count += 1
        return index < self.count

    def forget_before(self, index: int) -> None:
        for old in [key for key in self.loaded if key < index]:
            del self.loaded[old]

    def _prepare(self, array: np.ndarray) -> _Frame:
        h, w = array.shape[:2]
        if self.geometry is None:
            self.geometry = _Geometry.of(h, w)
        pad_h, pad_w = self.geometry.padded
        if h > pad_h or w > pad_w:
            raise ValueError(f"the frames of a clip share one size: frame {self.count} is {w}x{h}, the first fits "
                             f"{pad_w}x{pad_h}")
        pixels = torch.from_numpy(array if array.flags.writeable else array.copy()).to(self.device)
        tensor = rearrange(pixels, "h w c -> 1 c h w").to(self.dtype) / 255
        return _Frame(array, F.pad(tensor, (0, pad_w - w, 0, pad_h - h), mode="replicate"))


class RifeInterpolator:
    """Frames at fractional positions from a loaded IFNet; see the module docstring."""

    def __init__(self, model: IFNet):
        parameter = next(model.parameters())
        self.model, self.device, self.dtype = model, parameter.device, parameter.dtype

    def frames(self, source: Iterable[np.ndarray], positions: Iterable[Fraction],
               is_cut: Callable[[np.ndarray, np.ndarray], bool],
               timings: dict[str, float] | None = None) -> Generator[np.ndarray, None, None]:
        """Yield one uint8 (h, w, 3) frame per position (non-decreasing, in source frames, from 0). Time spent
        preparing frames and running the model goes to timings["interpolate"]."""
        timings = timings if timings is not None else {}
        frames = _Source(iter(source), is_cut, self.device, self.dtype)
        order: deque[np.ndarray | int] = deque()  # output frames in order: ready, or the number of a model job
        jobs: list[tuple[_Frame, _Frame, float]] = []  # (frame i, frame i + 1, t) waiting for the model
        made: dict[int, np.ndarray] = {}
        submitted = 0
        for position in positions:
            index, t = math.floor(position), position - math.floor(position)
            started = time.perf_counter()
            if not frames.has(index):  # past the last frame: hold it
                index, t = frames.count - 1, Fraction(0)
            if t and not frames.has(index + 1):
                t = Fraction(0)
            _add_time(timings, started)
            if index < 0:
                return  # no frames at all
            frames.forget_before(index)
            if t == 0:
                order.append(frames.loaded[index].array)
            elif index in frames.cut_after:  # never blend two scenes: the nearer frame, the earlier at a tie
                order.append(frames.loaded[index if t <= Fraction(1, 2) else index + 1].array)
            else:
                jobs.append((frames.loaded[index], frames.loaded[index + 1], float(t)))
                order.append(submitted)
                submitted += 1
                assert frames.geometry is not None  # set by the first frame read
                if len(jobs) == frames.geometry.batch_size:
                    self._run(jobs, submitted, made, frames.geometry.scale, timings)
            while order and (not isinstance(order[0], int) or order[0] in made):
                ready = order.popleft()
                yield made.pop(ready) if isinstance(ready, int) else ready
        if jobs:
            assert frames.geometry is not None
            self._run(jobs, submitted, made, frames.geometry.scale, timings)
        while order:
            ready = order.popleft()
            yield made.pop(ready) if isinstance(ready, int) else ready

    def _run(self, jobs: list[tuple[_Frame, _Frame, float]], submitted: int, made: dict[int, np.ndarray],
             scale: float, timings: dict[str, float]) -> None:
        """Run the model on the waiting jobs (the last of them numbered `submitted - 1`); their frames go to
        `made`."""
        started = time.perf_counter()
        h, w = jobs[0][0].array.shape[:2]
        first = torch.cat([before.tensor for before, _, _ in jobs])  # (b, 3, h_pad, w_pad)
        second = torch.cat([after.tensor for _, after, _ in jobs])
        timestep = torch.tensor([t for _, _, t in jobs], device=self.device)
        with torch.inference_mode():
            out = self.model(first, second, timestep, scale)[:, :, :h, :w]
        pixels = (out.float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = rearrange(pixels, "b c h w -> b h w c").contiguous().cpu().numpy()
        for offset, array in enumerate(arrays):
            made[submitted - len(jobs) + offset] = array
        jobs.clear()
        _add_time(timings, started)


def _add_time(timings: dict[str, float], started: float) -> None:
    timings["interpolate"] = timings.get("interpolate", 0.0) + time.perf_counter() - started
