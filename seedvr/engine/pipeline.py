"""One-step SeedVR2 restoration of a clip or an image, as the official inference script runs it.

    frames (f, H, W, 3) uint8
      -> preprocess (3, f, Hc, Wc) in [-1, 1] -> pad to f_pad = 4k+1 frames
      -> VAE encode -> posterior sample · scaling -> cond latent (t, h, w, 16)
      -> condition noise: lerp(cond latent, aug noise, t_c/T), t_c = 0 by default (the official output)
      -> Euler sampling of the DiT from noise at t = 1000 (one step: x_0 = noise − v)
      -> VAE decode (3, f_pad, Hc, Wc) -> first f frames -> colour fix against the input -> uint8 (f, Hc, Wc, 3)

Shapes: f frames, t h w the latent grid (t = (f_pad − 1)/4 + 1, h = Hc/8, w = Wc/8), l = t·h·w tokens.
Precision: float32 on CPU by default (the goldens' precision). With bf16 (the official runs on CUDA; on
CPU too, so the dtype policy is tested without a GPU): the models already hold their compute precision (the
loader does that: bf16 Linear layers with fp32 norms, rope and modulation, a bf16 VAE), eps/noise are drawn
in bf16, the sampler state and x_0 stay float32, and the colour fix runs its content branch in bf16.
On CUDA the VAE's convolutions run in channels_last_3d (seedvr.models.causal_conv.conv_memory_format) and
cuDNN benchmarks its algorithms (seedvr.engine.cuda_setup).
"""

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from seedvr.engine import cuda_setup, diffusion, memory_plan
from seedvr.engine.colorfix import METHODS as COLOR_FIX_METHODS
from seedvr.engine.colorfix import color_fix as apply_color_fix
from seedvr.engine.memory_plan import Footprint, MemoryPlan, tile_overlap
from seedvr.engine.preprocess import pad_frames, preprocess, to_uint8
from seedvr.engine.restorer import Frames, LatentShape, RestoreInterrupted, Sampling, latent_shape
from seedvr.models.attention import resolve_backend
from seedvr.models.block_offload import BlockOffload
from seedvr.models.causal_conv import FrameGroupNorm, conv_memory_format
from seedvr.models.dit_base import NaDiTBase
from seedvr.models.vae import VideoAutoencoder
from seedvr.models.vae_tiling import SpatialTiling

if TYPE_CHECKING:
    from seedvr.distributed.comm import SequenceParallel

POSTPROCESS_CHUNK = 8  # frames colour-fixed and quantised at a time (bounds the temporary memory)
CPU_DTYPES = (torch.float32, torch.bfloat16)  # float16 convolutions and norms are CUDA-only in practice


class SeedVR2:
    """The restoration pipeline around a loaded DiT (3B or 7B) and the VAE; a `Restorer`.

    dit, vae: already on `device` in their compute precision. pos_emb, neg_emb: (tokens, txt_in_dim)
    text embeddings; the negative one is used only when cfg_scale != 1. sp: this process's place in a
    sequence-parallel group (the rank processes of seedvr.spgroup pass theirs); the DiT and the VAE then
    split their work over it. random_weights: the weights are a plumbing check (seedvr.tools.tiny).
    Sets the VAE's conv layout for the device and its dtype, and on CUDA turns on cuDNN's benchmark.
    """

    def __init__(self, dit: NaDiTBase, vae: VideoAutoencoder, pos_emb: torch.Tensor, neg_emb: torch.Tensor, *,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, scaling_factor: float = 0.9152,
                 shifting_factor: float = 0.0, sp: "SequenceParallel | None" = None, random_weights: bool = False):
        self._device = torch.device(device)
        if dtype not in CPU_DTYPES and self._device.type != "cuda":
            raise ValueError(f"{dtype} needs a CUDA device; on {self._device} the pipeline runs in "
                             f"{' or '.join(map(str, CPU_DTYPES))}")
        self._dtype = dtype
        self.dit = dit
        self.vae = vae
        vae.memory_format = conv_memory_format(self._device, vae.dtype)
        if self._device.type == "cuda":
            cuda_setup.enable_cudnn_benchmark()
        self.sp = sp
        self._random_weights = random_weights
        self._compiled = False
        self._interrupted = False
        self._step_listeners: list[Callable[[], None]] = []
        for module in (*dit.blocks, *(m for m in vae.modules() if isinstance(m, torch.nn.Conv3d))):
            module.register_forward_pre_hook(self._step)
        # Stored bf16 officially; the official sampler casts them to the DiT's float32 parameter dtype.
        self.pos_emb = pos_emb.to(self.device, torch.float32)
        self.neg_emb = neg_emb.to(self.device, torch.float32)
        self.scaling_factor = scaling_factor
        self.shifting_factor = shifting_factor

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def devices(self) -> tuple[str, ...]:
        return (str(self._device),)

    @property
    def random_weights(self) -> bool:
        return self._random_weights

    @property
    def attention_backend(self) -> str:
        return self.dit.attention_backend

    def set_attention_backend(self, name: str) -> None:
        resolve_backend(name)  # ValueError when this machine cannot run it
        self.dit.attention_backend = name

    @property
    def compiled(self) -> bool:
        return self._compiled

    def set_compiled(self, enabled: bool) -> None:
        """Regional torch.compile: each DiT block, and each VAE norm with its SiLU, compiled on its own (dynamic
        shapes, the default mode: no CUDA graphs), so a recompile is one region's, and block offload keeps
        working."""
        norms = [module for module in self.vae.modules() if isinstance(module, FrameGroupNorm)]
        for region in (*self.dit.blocks, *norms):
            if enabled:
                region.compile(dynamic=True)
            else:
                region._compiled_call_impl = None  # what nn.Module.compile set: the eager call again
        self._compiled = enabled

    def latent_shape(self, frames: int, height: int, width: int) -> LatentShape:
        return latent_shape(frames, height, width, self.vae.spatial_downsample_factor, self.vae.latent_channels)

    def footprint(self) -> Footprint:
        return memory_plan.measure_footprint(self.dit, self.vae, self.dtype)

    def resident_weight_bytes(self) -> int:
        return memory_plan.resident_bytes((self.dit, self.vae), self.device)

    def interrupt(self) -> None:
        """The restore in flight raises RestoreInterrupted at the next DiT block or VAE convolution it enters
        (a kernel already running cannot be stopped from outside)."""
        self._interrupted = True

    def on_step(self, listener: Callable[[], None]) -> None:
        """Call `listener` at every step of the work: each DiT block and VAE convolution it enters (a rank
        counts its progress with it)."""
        self._step_listeners.append(listener)

    def _step(self, *_: object) -> None:
        """A forward pre-hook on every DiT block and VAE convolution: stops an interrupted restore, tells the
        listeners."""
        if self._interrupted:
            raise RestoreInterrupted("the restore was interrupted")
        for listener in self._step_listeners:
            listener()

    def close(self) -> None:
        """Nothing to stop in one process: the weights go when the last reference does."""
        if self.dit.block_offload is not None:
            self.dit.block_offload.close()
            self.dit.block_offload = None

    def apply_plan(self, plan: MemoryPlan) -> None:
        """Set the models up as a memory plan says (seedvr.engine.memory_plan): the VAE's exact temporal slicing and
        conv splitting, its opt-in spatial tiles, DiT block offload. Chunking is the caller's (seedvr.engine.chunking)."""
        self.vae.temporal_chunk = plan.vae_temporal_chunk
        self.vae.conv_max_bytes = plan.vae_conv_max_bytes
        self.vae.tiling = None if plan.vae_tile is None else SpatialTiling(plan.vae_tile, tile_overlap(plan.vae_tile))
        offload = self.dit.block_offload
        if plan.dit_offload and offload is None:
            self.dit.block_offload = BlockOffload(self.dit.blocks, self.device)
        elif not plan.dit_offload and offload is not None:
            offload.close()
            self.dit.block_offload = None

    @torch.inference_mode()
    def restore(self, frames: Frames, *, res_h: int, res_w: int, sampling: Sampling = Sampling(),
                eps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                aug_noise: torch.Tensor | None = None, clip_latent_frames: int | None = None,
                timings: dict[str, float] | None = None, stages: dict[str, torch.Tensor] | None = None,
                on_phase: Callable[[str], None] | None = None) -> torch.Tensor:
        """uint8 (f, H, W, 3) frames (torch or numpy) -> restored uint8 (f, Hc, Wc, 3) on CPU.

        res_h x res_w: the area the output aims at (seedvr.engine.preprocess.output_size).
        sampling.seed: a per-request generator, drawn in the official order (posterior eps, x_T noise, aug
        noise; the aug noise only matters when sampling.cond_noise_scale > 0).
        eps (1, 16, t, h, w) / noise, aug_noise (t, h, w, 16): injected instead of the drawn ones (the draws
        still happen). clip_latent_frames: when these frames are one chunk of a longer clip, the latent frames
        of the whole clip; the condition-noise level is then the whole clip's (see `_noised_condition`).
        timings: filled with seconds per phase. stages: filled with float32 CPU copies of the intermediates,
        named as in the golden pipeline_tiny (costs memory; for tests and debugging).
        on_phase: called with each phase's name as it starts (progress reporting).
        """
        if sampling.color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"unknown color_fix {sampling.color_fix!r}; must be one of "
                             f"{', '.join(COLOR_FIX_METHODS)}")
        if not 0.0 <= sampling.cond_noise_scale <= 1.0:
            raise ValueError(f"cond_noise_scale must be between 0.0 and 1.0, got {sampling.cond_noise_scale}")
        self._interrupted = False  # an interrupt stops the restore in flight, not the next one
        timesteps = diffusion.uniform_trailing_timesteps(sampling.sample_steps, device=self.device)
        record = _StageRecorder(stages)
        phase = _PhaseTimer(self.device, timings, on_phase)
        generator = torch.Generator(self.device).manual_seed(sampling.seed)

        with phase("preprocess"):
            video = preprocess(frames, res_h, res_w, device=self.device)  # (3, f, Hc, Wc) float32
            record("preprocessed", video)
            encode_input = pad_frames(video)  # (3, f_pad, Hc, Wc)
            record("vae_encode_input", encode_input)
        with phase("vae_encode"):
            cond_latent = self._encode(encode_input, generator, eps, record)  # (t, h, w, 16)
            del encode_input
            x_T = _draw_like_latent(cond_latent, generator)
            aug = _draw_like_latent(cond_latent, generator)  # the official aug noise, drawn even when unused
            if noise is not None:
                x_T = _injected(noise, cond_latent, "noise")
            if aug_noise is not None:
                aug = _injected(aug_noise, cond_latent, "aug_noise")
            record("noise", x_T)
            record("aug_noise", aug)
            cond_latent = self._noised_condition(cond_latent, aug, sampling.cond_noise_scale, clip_latent_frames,
                                                 record)
            del aug
        with phase("dit"):
            sample = self._sample(cond_latent, x_T, timesteps, sampling.cfg_scale, sampling.cfg_rescale,
                                  record)  # (t, h, w, 16)
            del cond_latent, x_T
        with phase("vae_decode"):
            decoded = self._decode(sample)  # (3, f_pad, Hc, Wc)
            record("decoded", decoded)
            del sample
        with phase("postprocess"):
            return self._postprocess(decoded, video, sampling.color_fix, record)

    def _encode(self, encode_input: torch.Tensor, generator: torch.Generator, eps: torch.Tensor | None,
                record: "_StageRecorder") -> torch.Tensor:
        """(3, f_pad, Hc, Wc) -> cond latent (t, h, w, 16) = posterior sample · scaling (VAE dtype)."""
        mean, logvar = self.vae.encode(encode_input[None], sp=self.sp)  # (1, 16, t, h, w) each
        std = torch.exp(0.5 * logvar)
        del logvar
        record("posterior_mean", mean)
        record("posterior_std", std)
        drawn = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        eps = drawn if eps is None else _injected(eps, mean, "eps")
        record("eps_posterior", eps)
        latent = mean + std * eps
        del mean, std, eps, drawn
        # Channels-last view of channels-first memory, as the official rearrange leaves it: the x_T noise is
        # drawn "like" this tensor, and the generator fills such a layout differently from a contiguous one.
        cond_latent = (latent[0].permute(1, 2, 3, 0) - self.shifting_factor) * self.scaling_factor
        record("cond_latent", cond_latent)
        return cond_latent

    def _noised_condition(self, cond_latent: torch.Tensor, aug_noise: torch.Tensor, scale: float,
                          clip_latent_frames: int | None, record: "_StageRecorder") -> torch.Tensor:
        """cond latent (t, h, w, 16) -> lerp(cond latent, aug noise, t_c/T), in the latent's dtype: the official
        `_add_noise` of the "sr" condition, with t_c = timestep_transform(T·scale) (seedvr.engine.diffusion).

        The official computes the mix in float32 (t_c carries dims, so it promotes) and stores it in the bf16
        condition buffer; so do we. At scale 0, t_c = 0 and the mix is 1·x + 0·aug = x exactly: the official
        output, bit for bit (tests/test_cond_noise.py). What the knob does: see `Sampling.cond_noise_scale`.

        Which grid sets the shift. timestep_transform reads a latent shape as (t, h, w): pixel frames
        (t − 1)·4 + 1, pixel sides 8h x 8w. The official caller passes `latent.shape[1:]` of its (t, h, w, c)
        latent, i.e. (h, w, c): frames from h, height from w, width from c = 16 channels. That is dormant
        there (scale hard-coded to 0) and we do not copy it: the shift would depend on the channel count,
        an image would take the video fit, and the clip length would not count at all (the resulting shift
        is what a ~64-frame clip should get: 2.7 at 720p, 5.0 at 1080p, 17 at 4K, whatever the length).
        We pass the (t, h, w) the function is written for. Parity with other front-ends that expose the knob
        is out of reach anyway: numz's ComfyUI-SeedVR2_VideoUpscaler (`latent_noise_scale`) keeps the official
        call but mixes towards 0.1·x_T + 0.05·randn instead of a fresh standard normal.
        A chunk of a longer clip (clip_latent_frames) takes the whole clip's t: the level is a property of
        the clip, as the position-keyed noise is (seedvr.engine.chunking), not of where the chunks fall, so
        a short last chunk is not restored more gently than the others.
        """
        latent_frames, height, width = cond_latent.shape[:3]
        if clip_latent_frames is not None:
            latent_frames = clip_latent_frames
        stride, factor = self.vae.temporal_downsample_factor, self.vae.spatial_downsample_factor
        timestep = diffusion.condition_timestep(scale, (latent_frames - 1) * stride + 1, height * factor,
                                                width * factor).to(self.device)
        record("cond_noise_timestep", timestep)
        mixed = diffusion.lerp(cond_latent, aug_noise, timestep.reshape((1,) * cond_latent.ndim))  # float32
        return mixed.to(cond_latent.dtype)

    def _sample(self, cond_latent: torch.Tensor, x_T: torch.Tensor, timesteps: torch.Tensor, cfg_scale: float,
                cfg_rescale: float, record: "_StageRecorder") -> torch.Tensor:
        """Euler sampling of x_0 (t, h, w, 16) float32 from x_T, conditioned on [cond latent | 1]."""
        grid = cond_latent.shape[:3]
        condition = torch.cat([cond_latent, torch.ones_like(cond_latent[..., :1])], dim=-1)  # (t, h, w, 17)
        record("condition", condition)
        condition = condition.flatten(0, 2).float()  # (l, 17)
        vid_shape = torch.tensor([grid], dtype=torch.int64, device=self.device)
        dit_calls = itertools.count()  # index of each DiT call, for the stage names

        def velocity_with(txt: torch.Tensor) -> diffusion.VelocityFn:
            txt_shape = torch.tensor([[txt.shape[0]]], dtype=torch.int64, device=self.device)

            def velocity(x_t: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
                inputs = dict(vid=torch.cat([x_t, condition], dim=-1), txt=txt, vid_shape=vid_shape,
                              txt_shape=txt_shape, timestep=t.reshape(1))
                v = self.dit(**inputs, sp=self.sp)  # (l, 16)
                call = next(dit_calls)
                for name, value in (*inputs.items(), ("out", v)):
                    record(f"dit{call}_{name}", value)
                return v

            return velocity

        velocity = diffusion.guided_velocity(velocity_with(self.pos_emb), velocity_with(self.neg_emb),
                                             cfg_scale, cfg_rescale)
        record("timesteps", timesteps)
        x_0 = diffusion.sample_euler(velocity, x_T.flatten(0, 2).float(), timesteps)  # (l, 16) float32
        sample = x_0.unflatten(0, grid)
        record("sample_latent", sample)
        return sample

    def _decode(self, sample: torch.Tensor) -> torch.Tensor:
        """x_0 (t, h, w, 16) -> video (3, f_pad, Hc, Wc) in the VAE dtype."""
        latent = sample.to(self.vae.dtype) / self.scaling_factor + self.shifting_factor
        return self.vae.decode(latent.permute(3, 0, 1, 2)[None], sp=self.sp)[0]

    def _postprocess(self, decoded: torch.Tensor, video: torch.Tensor, color_fix: str,
                     record: "_StageRecorder") -> torch.Tensor:
        """Colour fix of the first f decoded frames against the preprocessed input; uint8 (f, Hc, Wc, 3) on CPU."""
        num_frames, height, width = video.shape[1:]
        decoded = decoded[:, :num_frames]  # drop the 4k+1 padding frames
        restored = torch.empty((num_frames, height, width, 3), dtype=torch.uint8)
        for start in range(0, num_frames, POSTPROCESS_CHUNK):
            chunk = slice(start, start + POSTPROCESS_CHUNK)
            content = decoded[:, chunk].transpose(0, 1)  # (n, 3, Hc, Wc)
            style = video[:, chunk].transpose(0, 1)
            corrected = apply_color_fix(content, style, color_fix)
            restored[chunk] = to_uint8(corrected).cpu()
            record("colorfix_content", content, append=True)
            record("colorfix_style", style, append=True)
            record("color_corrected", corrected, append=True)
        record("final_uint8", restored)
        return restored


def _draw_like_latent(latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A standard normal with the latent's shape, dtype and memory layout (the official randn_like)."""
    return torch.empty_like(latent, memory_format=torch.preserve_format).normal_(generator=generator)


def _injected(tensor: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.shape != like.shape:
        raise ValueError(f"injected {name} must have shape {tuple(like.shape)}, got {tuple(tensor.shape)}")
    return tensor.to(like.device, like.dtype)


class _StageRecorder:
    """Keeps float32 CPU copies of intermediate tensors in `stages` (does nothing when it is None)."""

    def __init__(self, stages: dict | None):
        self.stages = stages
        self.appended: set[str] = set()  # names recorded in pieces during this run

    def __call__(self, name: str, tensor: torch.Tensor, append: bool = False) -> None:
        """Record `tensor` under `name`; with append, concatenate it to what this run recorded before."""
        if self.stages is None:
            return
        dtype = tensor.dtype if tensor.dtype in (torch.int64, torch.uint8) else torch.float32
        copy = tensor.detach().to("cpu", dtype, copy=True)
        if append and name in self.appended:
            copy = torch.cat([self.stages[name], copy])
        elif append:
            self.appended.add(name)
        self.stages[name] = copy.contiguous()


class _PhaseTimer:
    """Context manager per phase; adds its wall time in seconds to `timings` (synchronising CUDA) and tells
    `on_start` the phase's name as it begins."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None,
                 on_start: Callable[[str], None] | None = None):
        self.device = device
        self.timings = timings
        self.on_start = on_start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_start is not None:
            self.on_start(name)
        if self.timings is None:
            yield
            return
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
