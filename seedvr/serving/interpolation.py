"""Frame interpolation of a request (`interpolate_factor`, `interpolation`): checked before any work, run after
restoration, between the model and the encoder.

    check(spec, items)                      # INVALID_INPUT / MODEL_NOT_AVAILABLE before the model is touched
    retiming = retiming_of(spec, item)      # the output's frames, rate and times (seedvr.io.media.interpolation)
    for frame in interpolated(spec, retiming, restored, device, timings): writer.write(frame)

Methods: "rife" (RIFE 4.13.2 on the model's device, seedvr.engine.interpolation; its weights come from
`python -m seedvr.weights download --model rife`), "mci" (ffmpeg's motion-compensated minterpolate, no weights),
"auto" = rife when its weights are present, else mci. Both repeat the nearer frame across a scene cut (found
by seedvr.io.media.interpolation.SceneCuts).
Interpolation applies to videos; the images of a mixed list are left as they are.
"""

import logging
import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from seedvr import settings
from seedvr.engine.interpolation import RifeInterpolator, checkpoint_path, compute_dtype, load_rife
from seedvr.errors import INVALID_INPUT, CheckpointError, RestoreError
from seedvr.io.inputs import InputItem
from seedvr.io.media.interpolation import (
    Retiming,
    SceneCuts,
    exact_factor,
    factor_problem,
    motion_interpolated,
    rate_problem,
)
from seedvr.models.rife import RIFE_WEIGHTS, IFNet
from seedvr.tools import weights

log = logging.getLogger(__name__)

METHODS = ("auto", "rife", "mci")
DOWNLOAD_COMMAND = f"python -m seedvr.weights download --model {RIFE_WEIGHTS.name}"


@dataclass(frozen=True)
class InterpolationSpec:
    """What a request asks of interpolation: the factor (1 = none) and the method ("auto", "rife", "mci")."""

    factor: Fraction = Fraction(1)
    method: str = "auto"

    @classmethod
    def of(cls, factor: float, method: str) -> "InterpolationSpec":
        return cls(exact_factor(factor), method)

    @property
    def active(self) -> bool:
        return self.factor != 1


def method_of(spec: InterpolationSpec) -> str:
    """The method that runs: "auto" resolved by whether the RIFE weights are present."""
    if spec.method == "auto":
        return "rife" if checkpoint_path().is_file() else "mci"
    return spec.method


def check(spec: InterpolationSpec, items: list[InputItem]) -> None:
    """Everything about interpolation that can fail, checked before the model is touched: a video to apply it to,
    output rates that can be written exactly, and when rife runs its weights, present and in the released layout
    (keys and shapes, from the file's header; fetched first when rife is asked for and SEEDVR_AUTO_DOWNLOAD is set;
    "auto" never downloads)."""
    if not spec.active:
        return
    videos = [item for item in items if item.kind == "video"]
    if not videos:
        fields = ", ".join(item.field for item in items)
        raise RestoreError(INVALID_INPUT, f"interpolate_factor applies to videos, and {fields} "
                                          f"{'is an image' if len(items) == 1 else 'are images'}: leave "
                                          "interpolate_factor out (or at 1), or send a video")
    problems = [problem for item in videos if item.fps is not None
                and (problem := rate_problem(item.fps, spec.factor, item.field))]
    if problems:
        raise RestoreError(INVALID_INPUT, "; ".join(problems))
    if method_of(spec) != "rife":
        return
    path = checkpoint_path()
    if not path.is_file():
        if not settings.current().auto_download:
            raise _missing_weights(path)
        log.info("SEEDVR_AUTO_DOWNLOAD=1: fetching the RIFE weights")
        weights.download(RIFE_WEIGHTS.name)
    with torch.device("meta"):
        weights.check_checkpoint(IFNet(), path)


def retiming_of(spec: InterpolationSpec, item: InputItem) -> Retiming:
    """The output's frame count, rate and times for a video item (a factor of 1 changes nothing)."""
    assert item.fps is not None, "a video item carries its rate"
    return Retiming(spec.factor, item.frame_count, item.fps)


def interpolated(spec: InterpolationSpec, retiming: Retiming, frames: Iterable[np.ndarray], device: torch.device,
                 timings: dict[str, float]) -> Generator[np.ndarray, None, None]:
    """The frames to encode: `frames` themselves at factor 1, else the interpolated stream (rife on `device`).
    Closing it stops the interpolation (ffmpeg ends)."""
    if not spec.active:
        yield from frames
    elif method_of(spec) == "mci":
        yield from motion_interpolated(frames, retiming, timings)
    else:
        yield from _rife(device).frames(frames, retiming.positions(), SceneCuts().between, timings)


def describe(spec: InterpolationSpec, item: InputItem) -> dict:
    """processing_info.interpolation of a video item."""
    retiming = retiming_of(spec, item)
    variable = item.video is not None and item.video.frame_times is not None
    facts: dict = {"method": method_of(spec), "factor": float(spec.factor),
                   "output_fps": "variable" if variable else str(retiming.output_fps)}
    if variable:
        facts["average_output_fps"] = str(retiming.output_fps)
    facts.update(frames=retiming.output_frames, source_frames=retiming.source_frames)
    return facts


# The loaded RIFE, kept between jobs (21 MB): one at a time, for the checkpoint file as it is now and a device.
_loaded: dict[tuple, RifeInterpolator] = {}
_lock = threading.Lock()


def _rife(device: torch.device) -> RifeInterpolator:
    path = checkpoint_path()
    key = _key(path, device)
    with _lock:
        if key not in _loaded:
            log.info("loading RIFE from %s on %s (%s)", path, device, compute_dtype(device))
            _loaded.clear()
            _loaded[key] = RifeInterpolator(load_rife(path, device))
        return _loaded[key]


def _key(path: Path, device: torch.device) -> tuple:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise _missing_weights(path) from None
    return str(path), stat.st_mtime_ns, stat.st_size, str(device)


def _missing_weights(path: Path) -> CheckpointError:
    return CheckpointError(f"interpolation 'rife' needs the RIFE weights at {path}: download them with "
                           f"`{DOWNLOAD_COMMAND}`, or send interpolation 'mci' (ffmpeg, no weights) or 'auto'")


# Request rules (seedvr.serving.schema): checks across fields, each parameter named after the field it reads.
def interpolate_factor_has_two_decimals(interpolate_factor: float) -> str | None:
    return factor_problem(interpolate_factor)


def interpolation_needs_a_factor(interpolate_factor: float, interpolation: str) -> str | None:
    if interpolation == "auto" or interpolate_factor != 1:
        return None
    return (f"interpolation {interpolation!r} has no frames to make at interpolate_factor 1: send interpolate_factor "
            "above 1 (e.g. 2), or leave interpolation out")


def interpolate_factor_needs_video(interpolate_factor: float, media_type: str, image: str | None = None) -> str | None:
    if interpolate_factor == 1 or (media_type != "image" and image is None):
        return None
    return ("interpolate_factor applies to videos, and this request sends an image (media_type 'image' or the "
            "legacy `image` field): leave interpolate_factor out, or send a video")


RULES = (interpolate_factor_has_two_decimals, interpolation_needs_a_factor, interpolate_factor_needs_video)
