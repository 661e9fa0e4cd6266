"""The seam between the engine and whatever holds a model: the `Restorer` protocol and the specs it takes.

Two things restore frames: the single-process pipeline (`seedvr.engine.pipeline.SeedVR2`) and the
sequence-parallel group of rank processes (`seedvr.spgroup.group.SequenceParallelGroup`). Both implement
`Restorer` completely, so chunking, the memory plan and the model holder are written against this protocol
alone and never ask which of the two they hold.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from seedvr.engine.preprocess import VAE_TEMPORAL_STRIDE, padded_frame_count

if TYPE_CHECKING:
    from seedvr.engine.memory_plan import Footprint, MemoryPlan



@dataclass(frozen=True)
class Sampling:
    """How one request samples: the diffusion options, the same for every chunk of every item."""

    seed: int = 666
    cfg_scale: float = 1.0  # 1.0: no guidance, one DiT call per step
    cfg_rescale: float = 0.0
    sample_steps: int = 1  # SeedVR2 is trained for one step
    color_fix: str = "wavelet"  # one of seedvr.engine.colorfix.METHODS
    # Restoration strength, 0.0-1.0: how much fresh noise is mixed into the input's latent (the DiT's
    # condition) before sampling, at timestep_transform(1000·scale) (SeedVR2's own mechanism, which the
    # official script fixes at 0). 0.0 is the official output, bit for bit. More noise in the condition: the
    # model trusts the input less and generates more of the detail itself, which helps heavily degraded input
    # (blocking, blur, noise it should not preserve) and can invent texture on clean input; the colour fix
    # keeps the colours. The level follows SeedVR2's resolution shift (seedvr.engine.diffusion): the same scale
    # noises a long or large clip more than a short or small one (0.5 -> t_c/T 0.60 at 720p x 21 frames, 0.81
    # at 720p x 121 frames, 0.85 for a 1080p image).
    cond_noise_scale: float = 0.0


@dataclass(frozen=True)
class LatentShape:
    """The latent grid of a clip: t latent frames of h x w, c channels (the shape of the x_T noise)."""

    frames: int
    height: int
    width: int
    channels: int


def latent_shape(frames: int, height: int, width: int, spatial_factor: int, channels: int) -> LatentShape:
    """The latent grid of `frames` frames of height x width pixels: the frames padded to 4k + 1 give k + 1
    latent frames (the causal VAE keeps the first frame alone), the sides shrink by `spatial_factor`."""
    padded = padded_frame_count(frames)
    return LatentShape((padded - 1) // VAE_TEMPORAL_STRIDE + 1, height // spatial_factor, width // spatial_factor,
                       channels)


Frames = np.ndarray | torch.Tensor  # uint8 (f, H, W, 3)


class RestoreInterrupted(RuntimeError):
    """`interrupt()` stopped a restore in flight (the job that asked for it was cancelled)."""


class Restorer(Protocol):
    """Restores clips with one loaded model, in one process or across a group of them."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def devices(self) -> tuple[str, ...]:
        """Where the model lives: one device per process (a group's ranks each hold the whole model)."""
        ...

    @property
    def random_weights(self) -> bool: ...

    @property
    def attention_backend(self) -> str: ...

    def set_attention_backend(self, name: str) -> None: ...

    @property
    def compiled(self) -> bool:
        """Whether the DiT blocks run torch.compile'd (regionally, one block at a time)."""
        ...

    def set_compiled(self, enabled: bool) -> None:
        """Compile the DiT blocks (the first call of each shape then compiles) or go back to eager."""
        ...

    def restore(self, frames: Frames, *, res_h: int, res_w: int, sampling: Sampling = Sampling(),
                eps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                aug_noise: torch.Tensor | None = None, clip_latent_frames: int | None = None,
                timings: dict[str, float] | None = None, stages: dict[str, torch.Tensor] | None = None,
                on_phase: Callable[[str], None] | None = None) -> torch.Tensor:
        """uint8 (f, H, W, 3) -> restored uint8 (f, Hc, Wc, 3) on the CPU; eps (1, c, t, h, w), noise and
        aug_noise (t, h, w, c) replace the drawn ones when given (chunking's position-keyed noise), and
        clip_latent_frames (a chunk's whole clip, in latent frames) sets the condition-noise level."""
        ...

    def latent_shape(self, frames: int, height: int, width: int) -> LatentShape:
        """The latent grid of `frames` frames restored to height x width pixels."""
        ...

    def apply_plan(self, plan: "MemoryPlan") -> None: ...

    def footprint(self) -> "Footprint": ...

    def resident_weight_bytes(self) -> int:
        """Bytes of weights held on the device (one rank's, for a group): reusable by a job's plan."""
        ...

    def interrupt(self) -> None:
        """From another thread: stop the restore in flight as soon as possible (a cancelled job); it raises
        RestoreInterrupted at the next DiT block or VAE convolution it enters (a group: SequenceParallelError,
        its ranks killed at once). The next restore runs normally."""
        ...

    def close(self) -> None: ...
