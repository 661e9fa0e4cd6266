"""One command for the day a GPU is lent: is the GPU path safe and how fast is it (issue 9, item 6).

    python benchmarks/gpu_suite.py           # one CUDA device, full-size models with random weights (< 8 min, H100)
    python benchmarks/gpu_suite.py --tiny    # the same checks on the CPU with the tiny configuration (< 3 min)

Prints one JSON line per check, then a summary line; exits 1 when a check failed (a skip is not a failure):

    environment     torch, CUDA, cuDNN (and whether it is in 9.8-9.14, where PyTorch sends bf16 NCDHW convs to
                    slow_conv_dilated3d: pytorch #163539 / PR #163581), flash-attn, the device
    vae_conv        the VAE's largest conv (c0 channels at 720p) in each layout: seconds, the aten op that ran,
                    agreement with float32, extra memory
    dit_precision   the DiT (full width, a few blocks) in bf16 against float32 on a small grid; host syncs per
                    forward at two depths (they must not grow with the blocks)
    attention       flash-attn against sdpa on a 720p window packing: agreement and seconds (skipped without flash)
    pipeline        the whole restoration, random full-size weights: 3B and 7B at 1280x720, 21 frames, and 7B at
                    1920x1080 when its memory plan fits; seconds per phase, frames/s, peak memory per phase against
                    the memory plan's estimate; for the 3B also DiT block offload against resident blocks
    oom             a real out-of-memory error (CUDA: memory fraction capped; CPU: address space capped) survived:
                    nothing leaked, and the pipeline still restores afterwards

Random weights: each model is built by its own constructor directly on the device (nothing is initialised on
the host or copied to the device), then every parameter is redrawn on the device at a sensible scale, never
zeros (speed does not depend on the values; zeros would take shortcuts in some kernels). The inputs are a moving
test pattern. The whole float32 model exists on the device for a moment before the cast to bf16 (7B: 33 GB).
"""

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from bench_pipeline import moving_pattern
from omegaconf import DictConfig, OmegaConf

from seedvr.engine import cuda_setup, memory_plan
from seedvr.engine.loader import build_models
from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.preprocess import output_size
from seedvr.models.attention import available_backends, sdpa_plan, varlen_attention
from seedvr.models.block_offload import BlockOffload
from seedvr.models.registry import card
from seedvr.models.window import pack_windows
from seedvr.tools import tiny

REPO_ROOT = Path(__file__).resolve().parent.parent
CUDNN_AFFECTED = (90800, 91500)  # [from, to): PR #163581's `cudnn_version >= 90800 && cudnn_version < 91500`
CONV_REL_TOL = 1e-2  # bf16 conv vs float32, max error / max |reference|: bf16's 8-bit mantissa is 3.9e-3
ATTENTION_REL_TOL = 1e-2  # flash vs sdpa in bf16, same measure
DIT_REL_TOL = 5e-2  # bf16 DiT vs float32 (random weights), max error / max |reference|; tiny CPU: about 1e-2
TEXT_TOKENS = tiny.POSITIVE_TOKENS  # the official positive embedding's length


@dataclass(frozen=True)
class Scale:
    """What the checks run at: the real sizes on a GPU, or the tiny configuration on the CPU."""

    name: str
    device: torch.device
    dtype: torch.dtype
    conv: tuple[int, int, int, int]  # VAE conv input: channels, frames (after the causal padding), height, width
    dit_grid: tuple[int, int, int]  # latent frames, height, width of the DiT check
    dit_layers: tuple[int, int]  # two depths: host syncs must not grow with the blocks
    attention: tuple[tuple[int, int, int], int, int]  # patch grid, heads, head dim
    pipelines: tuple[tuple[str, int, int, int], ...]  # (model, width, height, frames)
    oom: tuple[int, int, int]  # the clip whose restore is made to run out of memory: width, height, frames
    repeats: int

    def config(self, size: str) -> DictConfig:
        if self.name == "tiny":
            return tiny.tiny_config(size)
        config = OmegaConf.load(REPO_ROOT / f"configs_{size}" / "main.yaml")
        assert isinstance(config, DictConfig)
        return config


def full_scale() -> Scale:
    return Scale("full", torch.device("cuda"), torch.bfloat16, conv=(128, 6, 720, 1280), dit_grid=(6, 24, 40),
                 dit_layers=(4, 8), attention=((6, 45, 80), 20, 128),
                 pipelines=(("3b", 1280, 720, 21), ("7b", 1280, 720, 21), ("7b", 1920, 1080, 21)),
                 oom=(1280, 720, 21), repeats=3)


def tiny_scale() -> Scale:
    return Scale("tiny", torch.device("cpu"), torch.bfloat16, conv=(8, 6, 144, 256), dit_grid=(3, 12, 20),
                 dit_layers=(4, 8), attention=((3, 9, 16), 2, 32),
                 pipelines=(("3b", 256, 144, 9), ("7b", 256, 144, 9), ("7b", 384, 216, 9)),
                 oom=(512, 288, 9), repeats=2)


def emit(check: str, **fields: Any) -> dict:
    line = {"check": check, **fields}
    print(json.dumps(line, default=str), flush=True)
    return line


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    result = run()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30)).item()


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter in place on its device: normal / sqrt(fan-in) for matrices and kernels, about 1 for
    norm weights and scales, small for the rest (seedvr.tools.tiny.randomise's scales, drawn on the device)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("scale") or "norm" in name:
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.05, generator=generator)


def build_pipeline(size: str, scale: Scale) -> SeedVR2:
    config = scale.config(size)
    dit, vae = build_models(f"seedvr2_{size}", config, device=scale.device)
    generator = torch.Generator(scale.device).manual_seed(0)
    randomise(dit, generator)
    randomise(vae, generator)
    dit.eval().requires_grad_(False).to_compute_dtype(scale.dtype)
    vae.eval().requires_grad_(False).to(dtype=scale.dtype)
    text = torch.randn(2, TEXT_TOKENS, config.dit.kwargs.txt_in_dim, generator=generator, device=scale.device)
    if scale.device.type == "cuda":
        torch.cuda.empty_cache()
    return SeedVR2(dit, vae, text[0], text[1], device=scale.device, dtype=scale.dtype,
                   scaling_factor=config.vae.scaling_factor, shifting_factor=config.vae.shifting_factor)


def check_environment(scale: Scale) -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import flash_attn  # the optional CUDA-only extra

        flash = getattr(flash_attn, "__version__", "unknown")
    except ImportError:
        flash = None
    device = {"name": torch.cuda.get_device_name(scale.device), "memory_bytes": torch.cuda.mem_get_info()[1]} \
        if scale.device.type == "cuda" else {"name": platform.processor() or "cpu", "threads": torch.get_num_threads()}
    return emit("environment", ok=True, scale=scale.name, torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=cudnn, cudnn_affected_range=cudnn is not None and CUDNN_AFFECTED[0] <= cudnn < CUDNN_AFFECTED[1],
                flash_attn=flash, attention_backends=available_backends(), device=device, python=sys.version.split()[0])


def conv_ops(run: Callable[[], Any]) -> list[str]:
    """The aten convolution implementations one call runs (cudnn_convolution, slow_conv_dilated3d, ...)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    names = {event.name for event in profile.events()}
    return sorted(name for name in names if "conv" in name and name not in ("aten::conv3d", "aten::convolution",
                                                                             "aten::_convolution"))


def check_vae_conv(scale: Scale) -> dict:
    channels, frames, height, width = scale.conv
    generator = torch.Generator(scale.device).manual_seed(1)
    x32 = torch.randn(1, channels, frames, height, width, generator=generator, device=scale.device)
    w32 = torch.randn(channels, channels, 3, 3, 3, generator=generator, device=scale.device) / (27 * channels) ** 0.5
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # a true float32 reference
        reference = F.conv3d(x32, w32, padding=(0, 1, 1))
    layouts = {}
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        x = x32.to(scale.dtype).contiguous(memory_format=layout)
        w = w32.to(scale.dtype).contiguous(memory_format=layout)

        def conv(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            with torch.no_grad():
                return F.conv3d(x, w, padding=(0, 1, 1))

        entry: dict[str, Any] = {}
        try:
            if scale.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(scale.device)
                before = torch.cuda.memory_allocated(scale.device)
            seconds, out = timed(conv, scale.device, scale.repeats)
            entry = {"seconds": seconds, "ops": conv_ops(conv), "rel_error": relative_error(out, reference),
                     "output_channels_last": out.is_contiguous(memory_format=torch.channels_last_3d)}
            if scale.device.type == "cuda":
                scratch = torch.cuda.max_memory_allocated(scale.device) - before - out.numel() * out.element_size()
                entry["scratch_bytes"] = scratch
                entry["scratch_over_input"] = scratch / (x.numel() * x.element_size())
            del out
        except torch.OutOfMemoryError as error:
            entry = {"oom": str(error).split("\n")[0]}
        layouts["channels_last_3d" if layout == torch.channels_last_3d else "contiguous"] = entry
    fast = layouts["channels_last_3d"]
    ok = "rel_error" in fast and fast["rel_error"] < CONV_REL_TOL and not any("slow_conv" in op for op in fast["ops"])
    return emit("vae_conv", ok=ok, input=[1, *scale.conv], dtype=str(scale.dtype), layouts=layouts)


def count_syncs(run: Callable[[], Any], device: torch.device) -> int | None:
    """CUDA host syncs during one call (torch.cuda.set_sync_debug_mode warnings); None on the CPU."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def check_dit_precision(scale: Scale) -> dict:
    lines: dict[str, dict[str, Any]] = {}
    for size in ("3b", "7b"):
        kwargs = OmegaConf.to_container(scale.config(size).dit.kwargs)
        assert isinstance(kwargs, dict)
        syncs: dict[int, int | None] = {}
        for layers in scale.dit_layers:
            overrides = {"num_layers": layers, **({"mm_layers": min(layers, kwargs["mm_layers"])} if size == "3b" else {})}
            with torch.device(scale.device):
                dit = card(f"seedvr2_{size}").dit_class(**{**kwargs, **overrides})
            randomise(dit, torch.Generator(scale.device).manual_seed(2))
            dit.eval().requires_grad_(False)
            t, h, w = scale.dit_grid
            generator = torch.Generator(scale.device).manual_seed(3)
            inputs = dict(vid=torch.randn(t * h * w, kwargs["vid_in_channels"], generator=generator, device=scale.device),
                          txt=torch.randn(TEXT_TOKENS, kwargs["txt_in_dim"], generator=generator, device=scale.device),
                          vid_shape=torch.tensor([[t, h, w]], device=scale.device),
                          txt_shape=torch.tensor([[TEXT_TOKENS]], device=scale.device),
                          timestep=torch.tensor([1000.0], device=scale.device))

            def forward(dit: torch.nn.Module = dit, inputs: dict = inputs) -> torch.Tensor:
                with torch.inference_mode():
                    return dit(**inputs)

            if layers == scale.dit_layers[0]:
                fp32_seconds, reference = timed(forward, scale.device, scale.repeats)
                dit.to_compute_dtype(scale.dtype)
                bf16_seconds, out = timed(forward, scale.device, scale.repeats)
                lines[size] = {"layers": layers, "fp32_seconds": fp32_seconds, "bf16_seconds": bf16_seconds,
                               "rel_error": relative_error(out, reference)}
            else:
                dit.to_compute_dtype(scale.dtype)
            syncs[layers] = count_syncs(forward, scale.device)
            del dit
        lines[size]["host_syncs_by_depth"] = syncs
    ok = all(entry["rel_error"] < DIT_REL_TOL and len(set(entry["host_syncs_by_depth"].values())) == 1
             for entry in lines.values())
    return emit("dit_precision", ok=ok, grid=list(scale.dit_grid), dtype=str(scale.dtype), models=lines)


def check_attention(scale: Scale) -> dict:
    grid, heads, head_dim = scale.attention
    if "flash" not in available_backends():
        return emit("attention", ok=True, skipped="flash-attn is not installed or CUDA is absent: only sdpa runs here")
    packing = pack_windows("720pwin_by_size_bysize", (4, 3, 3), [grid], [TEXT_TOKENS], device=scale.device)
    generator = torch.Generator(scale.device).manual_seed(4)
    q, k, v = (torch.randn(len(packing.pack_index), heads, head_dim, generator=generator, device=scale.device,
                           dtype=scale.dtype) for _ in range(3))
    plan = sdpa_plan(packing.seqlens, heads, scale.device)
    flash_seconds, flash = timed(lambda: varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, "flash"),
                                 scale.device, scale.repeats)
    sdpa_seconds, sdpa = timed(lambda: varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, "sdpa", plan),
                               scale.device, scale.repeats)
    error = relative_error(flash, sdpa)
    return emit("attention", ok=error < ATTENTION_REL_TOL, grid=list(grid), heads=heads, tokens=len(packing.pack_index),
                flash_seconds=flash_seconds, sdpa_seconds=sdpa_seconds, rel_error=error)


class PhasePeaks:
    """Peak device memory of each pipeline phase (CUDA allocator statistics; nothing on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: str | None = None
        self.peaks: dict[str, int] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __call__(self, phase: str | None) -> None:
        if self.device.type != "cuda":
            return
        synchronize(self.device)
        if self.current is not None:
            self.peaks[self.current] = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.current = phase


def check_pipeline(pipeline: SeedVR2, size: str, width: int, height: int, frames: int, scale: Scale) -> dict:
    clip = moving_pattern(frames, height // 2, width // 2)
    input_size, out_size = (height // 2, width // 2), output_size(height // 2, width // 2, height, width)
    footprint = pipeline.footprint()
    budget = memory_plan.available_memory(pipeline)
    plan, guess = memory_plan.choose(footprint, budget, frames, input_size, out_size)
    where = dict(model=size, output=f"{out_size[1]}x{out_size[0]}", frames=frames)
    if guess.peak > budget:
        return emit("pipeline", ok=True, skipped=f"the smallest plan needs {guess.peak / 2**30:.1f} GiB, "
                                                 f"{budget / 2**30:.1f} GiB available", **where)
    pipeline.apply_plan(plan)
    started = time.perf_counter()
    pipeline.restore(clip, res_h=height, res_w=width)  # the first run: cuDNN's algorithm search, allocator growth
    first_seconds = time.perf_counter() - started
    timings: dict[str, float] = {}
    peaks = PhasePeaks(pipeline.device)
    started = time.perf_counter()
    pipeline.restore(clip, res_h=height, res_w=width, timings=timings, on_phase=peaks)
    total = time.perf_counter() - started
    peaks(None)
    memory = {phase: {"peak_bytes": peaks.peaks.get(phase), "estimate_bytes": guess.at(phase)} for phase in guess.phases}
    within = all(peaks.peaks.get(phase, 0) <= guess.at(phase) for phase in guess.phases)
    line = dict(ok=True, **where, plan=plan.describe(), first_run_seconds=first_seconds, seconds=timings, total_seconds=total,
                frames_per_second=frames / total, estimate_peak_bytes=guess.peak, memory=memory, within_estimate=within)
    if size == "3b" and pipeline.dit.block_offload is None:  # (the plan may have chosen offload already)
        line["dit_offload"] = check_offload(pipeline, out_size, frames, scale)
    return emit("pipeline", **line)


def check_offload(pipeline: SeedVR2, out_size: tuple[int, int], frames: int, scale: Scale) -> dict:
    """One DiT call on this clip's latent grid with the blocks resident, then offloaded: seconds, equal output."""
    shape = pipeline.latent_shape(frames, *out_size)
    t, h, w = shape.frames, shape.height, shape.width
    dit, generator = pipeline.dit, torch.Generator(scale.device).manual_seed(5)
    channels = dit.vid_in.proj.in_features // math.prod(dit.patch_size)
    kwargs = dict(vid=torch.randn(t * h * w, channels, generator=generator, device=scale.device),
                  txt=pipeline.pos_emb, vid_shape=torch.tensor([[t, h, w]], device=scale.device),
                  txt_shape=torch.tensor([[pipeline.pos_emb.shape[0]]], device=scale.device),
                  timestep=torch.tensor([1000.0], device=scale.device))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return dit(**kwargs)

    resident_seconds, resident = timed(forward, scale.device, scale.repeats)
    dit.block_offload = BlockOffload(dit.blocks, scale.device)
    try:
        offload_seconds, offloaded = timed(forward, scale.device, scale.repeats)
    finally:
        dit.block_offload.close()
        dit.block_offload = None
    return {"resident_seconds": resident_seconds, "offload_seconds": offload_seconds,
            "equal": bool(torch.equal(resident, offloaded))}


def live_tensors() -> tuple[int, int]:
    """Count and bytes of the tensors Python still references (after a collection)."""
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]  # type(): no __class__ lookups
    return len(tensors), sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class MemoryCap:
    """A real memory limit for the duration of a `with`: CUDA's per-process memory fraction, or on the CPU the
    address-space limit (RLIMIT_AS) of this process, `headroom` bytes above what it uses now."""

    def __init__(self, device: torch.device, headroom: int) -> None:
        self.device, self.headroom = device, headroom
        self.limit: int | None = None

    def __enter__(self) -> "MemoryCap":
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            self.limit = torch.cuda.memory_reserved(self.device) + self.headroom
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit / total), self.device)
        else:
            import resource

            self.saved = resource.getrlimit(resource.RLIMIT_AS)
            self.limit = psutil.Process().memory_info().vms + self.headroom
            resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.saved[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        else:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self.saved)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA OOM, or the CPU allocator's (a RuntimeError "can't allocate memory"), or Python's."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def check_oom(pipeline: SeedVR2, scale: Scale) -> dict:
    """Restore a clip under a cap far below its need (whole clip, no offload, no tiles): it must fail with an
    out-of-memory error, leave no tensor and no device memory behind, and the pipeline must restore again."""
    width, height, frames = scale.oom
    small = moving_pattern(5, 32, 48)
    with torch.inference_mode():
        expected = pipeline.restore(small, res_h=64, res_w=96)
    pipeline.apply_plan(memory_plan.MemoryPlan(None, 0, None, memory_plan.CONV_MAX_BYTES, None, False))
    gc.collect()
    if scale.device.type == "cuda":
        torch.cuda.empty_cache()
    before_tensors = live_tensors()
    before_device = torch.cuda.memory_allocated(scale.device) if scale.device.type == "cuda" else None
    clip = moving_pattern(frames, height // 2, width // 2)
    headroom = 256 * 2**20 if scale.device.type == "cuda" else 32 * 2**20  # far below either clip's working set
    failure: str | None = None
    with MemoryCap(scale.device, headroom) as cap:
        try:
            pipeline.restore(clip, res_h=height, res_w=width)
        except Exception as error:  # the out-of-memory error is what this check wants
            failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if is_out_of_memory(error) else None
            if failure is None:
                raise
    del clip
    gc.collect()
    if scale.device.type == "cuda":
        torch.cuda.empty_cache()
    after_tensors = live_tensors()
    leaked_device = None if before_device is None else torch.cuda.memory_allocated(scale.device) - before_device
    with torch.inference_mode():
        again = pipeline.restore(small, res_h=64, res_w=96)
    off = (again.int() - expected.int()).abs().max().item()  # uint8 levels; GPU kernels may round differently
    restores = off <= 1
    ok = failure is not None and after_tensors[0] <= before_tensors[0] and not leaked_device and restores
    return emit("oom", ok=ok, cap_bytes=cap.limit, error=failure, live_tensors_before=before_tensors[0],
                live_tensors_after=after_tensors[0], leaked_device_bytes=leaked_device, restores_after=restores,
                max_diff_after=off)


def run_checks(scale: Scale) -> list[dict]:
    lines = [check_environment(scale)]
    checks: list[tuple[str, Callable[[], dict]]] = [
        ("vae_conv", lambda: check_vae_conv(scale)),
        ("dit_precision", lambda: check_dit_precision(scale)),
        ("attention", lambda: check_attention(scale)),
    ]
    for name, check in checks:
        lines.append(guarded(name, check))
    pipelines: dict[str, SeedVR2] = {}
    for size, width, height, frames in scale.pipelines:
        def one(size: str = size, width: int = width, height: int = height, frames: int = frames) -> dict:
            if size not in pipelines:
                release(pipelines, scale.device)
                pipelines[size] = build_pipeline(size, scale)
            return check_pipeline(pipelines[size], size, width, height, frames, scale)

        lines.append(guarded("pipeline", one))
    release(pipelines, scale.device)

    def oom() -> dict:
        pipelines["3b"] = build_pipeline("3b", scale)
        return check_oom(pipelines["3b"], scale)

    lines.append(guarded("oom", oom))
    release(pipelines, scale.device)
    return lines


def release(pipelines: dict[str, SeedVR2], device: torch.device) -> None:
    for pipeline in pipelines.values():
        pipeline.close()
    pipelines.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(name: str, check: Callable[[], dict]) -> dict:
    """A check's line, or a failed line naming the error: one broken check does not stop the others."""
    try:
        return check()
    except Exception as error:  # reported as a failed check; the suite goes on
        return emit(name, ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration on the CPU (CI)")
    args = parser.parse_args(argv)
    cuda_setup.set_allocator_defaults()  # as the worker does, before CUDA initialises
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU check")
    scale = tiny_scale() if args.tiny else full_scale()
    if scale.device.type == "cuda":
        cuda_setup.enable_cudnn_benchmark()  # as every CUDA pipeline does; the timed runs follow a warm-up call
    started = time.perf_counter()
    lines = run_checks(scale)
    failed = [line["check"] for line in lines if not line.get("ok")]
    emit("summary", ok=not failed, failed=failed, checks=len(lines), seconds=time.perf_counter() - started)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
