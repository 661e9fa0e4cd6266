"""The one warm model of this worker.

A `ModelHolder` owns at most one loaded model, a `Restorer`: the single-process pipeline, or with
sp_size > 1 a group of rank processes (seedvr.spgroup). It is loaded lazily by the first `initialize` or
`restore`; a request for another model frees the current one before loading the next, so two models never
share the GPU. One lock serialises loading and running: a job that switches models cannot free the weights
under a job still using them.

The warm model is sticky: a request field left out means "what is warm" (`resolve`), so a worker that
loaded 7B-sharp keeps it for every request that does not name another model. With nothing warm, the
defaults apply: seedvr2_3b (or the model that has the requested variant), normal, sp_size 1, auto.
"""

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from seedvr import settings
from seedvr.engine import loader
from seedvr.engine.restorer import Restorer
from seedvr.engine.upscaler import UPSCALER, find_upscaler, load_upscaler
from seedvr.errors import INVALID_INPUT, CheckpointError, RestoreError
from seedvr.models.attention import resolve_backend
from seedvr.models.registry import (
    DEFAULT_MODEL_TYPE,
    DEFAULT_VARIANT,
    card,
    owners_of,
    sp_size_problem,
    variant_problem,
)
from seedvr.serving.specs import ModelChoice
from seedvr.spgroup.group import SequenceParallelGroup
from seedvr.tools import weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model with every choice made."""

    model_type: str
    variant: str
    sp_size: int
    attention_backend: str
    compile: bool = False

    def same_weights(self, other: "ModelSpec") -> bool:
        """Whether `other` runs on the same loaded weights (attention backend and compile switch in place)."""
        return (self.model_type, self.variant, self.sp_size) == (other.model_type, other.variant, other.sp_size)


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    restorer: Restorer

    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @property
    def variant(self) -> str:
        return self.spec.variant

    @property
    def sp_size(self) -> int:
        return self.spec.sp_size

    @property
    def random_weights(self) -> bool:
        return self.restorer.random_weights


def open_restorer(spec: ModelSpec) -> Restorer:
    """Load a model: in this process, or in `sp_size` rank processes. An upscaler's variant is its name."""
    if spec.model_type == UPSCALER:
        return load_upscaler(spec.variant, find_upscaler(spec.variant), loader.default_device())
    if spec.sp_size == 1:
        return loader.load_pipeline(spec.model_type, spec.variant, attention_backend=spec.attention_backend)
    return SequenceParallelGroup(spec.model_type, spec.variant, spec.sp_size, spec.attention_backend)


WARM_UP_FRAMES, WARM_UP_SIDE = 5, 64  # the clip that compiles the DiT blocks before the first job


def _set_compiled(restorer: Restorer, enabled: bool) -> None:
    """Compile (and warm up, so that no job pays for it) or go back to eager."""
    if enabled == restorer.compiled:
        return
    restorer.set_compiled(enabled)
    if enabled:
        started = time.monotonic()
        clip = np.random.default_rng(0).integers(0, 256, (WARM_UP_FRAMES, WARM_UP_SIDE, WARM_UP_SIDE, 3), dtype=np.uint8)
        restorer.restore(clip, res_h=WARM_UP_SIDE, res_w=WARM_UP_SIDE)
        log.info("compiled the DiT blocks and warmed them up in %.1f s", time.monotonic() - started)


class ModelHolder:
    def __init__(self, opener: Callable[[ModelSpec], Restorer] = open_restorer):
        self._opener = opener
        self._lock = threading.RLock()
        self._model: LoadedModel | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    def describe(self) -> dict:
        model = self._model
        if model is None:
            return {"model_initialized": False, "model_type": None, "model_variant": None}
        restorer = model.restorer
        return {
            "model_initialized": True,
            "model_type": model.model_type,
            "model_variant": model.variant,
            "device": str(restorer.device),
            "devices": list(restorer.devices),
            "dtype": str(restorer.dtype).removeprefix("torch."),
            "sp_size": model.sp_size,
            "attention_backend": restorer.attention_backend,
            "compile": restorer.compiled,
            "random_weights": restorer.random_weights,
        }

    def resolve(self, choice: ModelChoice) -> ModelSpec:
        """The model a request gets: its explicit fields, else what is warm, else the defaults. INVALID_INPUT
        when that model cannot take the request's variant or sp_size, or this machine cannot run it. An upscaler
        (model_type "upscaler", named by `upscaler`) is never "what is warm" for a request that names no model."""
        if choice.model_type == UPSCALER:
            assert choice.upscaler is not None, "the schema requires upscaler with model_type 'upscaler'"
            return ModelSpec(UPSCALER, choice.upscaler, 1, "auto",
                             choice.compile if choice.compile is not None else settings.current().compile)
        warm = self._model.spec if self._model is not None and self._model.model_type != UPSCALER else None
        model_type, why = self._model_type(choice, warm)
        stays = warm is not None and warm.model_type == model_type
        variant = choice.variant or (warm.variant if stays and warm else DEFAULT_VARIANT)
        sp_size = choice.sp_size
        if sp_size is None:  # the warm group's size where it splits this model too
            sp_size = warm.sp_size if warm and sp_size_problem(model_type, warm.sp_size) is None else 1
        attention = choice.attention_backend or (warm.attention_backend if warm else "auto")
        compiled = choice.compile if choice.compile is not None else (
            warm.compile if warm else settings.current().compile)
        problems = [problem for problem in (variant_problem(model_type, variant, why),
                                            sp_size_problem(model_type, sp_size, why)) if problem]
        try:
            resolve_backend(attention)
        except ValueError as error:
            problems.append(f"attention_backend: {error}")
        gpus = torch.cuda.device_count()
        if sp_size > 1 and torch.cuda.is_available() and gpus < sp_size:
            problems.append(f"sp_size {sp_size} needs {sp_size} GPUs; this worker sees {gpus}: send sp_size {gpus} "
                            "or less (a divisor of the heads)")
        if problems:
            raise RestoreError(INVALID_INPUT, "; ".join(problems))
        return ModelSpec(model_type, variant, sp_size, attention, compiled)

    @staticmethod
    def _model_type(choice: ModelChoice, warm: ModelSpec | None) -> tuple[str, str]:
        """The model type, and the note that says where it came from when the request did not name it."""
        if choice.model_type is not None:
            return choice.model_type, ""
        variant = choice.variant
        if warm is not None and (variant is None or variant in card(warm.model_type).variants):
            return warm.model_type, " (the warm model, as model_type is not given)"
        if variant is None or variant in card(DEFAULT_MODEL_TYPE).variants or not owners_of(variant):
            return DEFAULT_MODEL_TYPE, " (the default, as model_type is not given)"
        return owners_of(variant)[0], f" (the model with variant {variant!r}, as model_type is not given)"

    def release(self) -> None:
        """Free the warm model (a group's rank processes end)."""
        with self._lock:
            if self._model is None:
                return
            log.info("releasing %s (%s)", self._model.model_type, self._model.variant)
            self._model.restorer.close()
            self._model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @staticmethod
    def _check_or_download(spec: ModelSpec) -> None:
        if spec.model_type == UPSCALER:
            find_upscaler(spec.variant)  # upscalers are the operator's files: nothing to download
            return
        try:
            loader.check_files(spec.model_type, spec.variant)
        except CheckpointError:
            if not settings.current().auto_download:
                raise
            log.info("SEEDVR_AUTO_DOWNLOAD=1: fetching %s (%s)", spec.model_type, spec.variant)
            weights.download(card(spec.model_type).weight_set(spec.variant))

    def ensure(self, spec: ModelSpec) -> LoadedModel:
        """Load the model unless it is the warm one; a warm one only switches its attention backend."""
        with self._lock:
            current = self._model
            if current is not None and current.spec.same_weights(spec):
                current.restorer.set_attention_backend(spec.attention_backend)
                _set_compiled(current.restorer, spec.compile)
                self._model = LoadedModel(spec, current.restorer)
                return self._model
            self._check_or_download(spec)  # fail before freeing the warm model
            self.release()
            log.info("loading %s (%s), sp_size %d", spec.model_type, spec.variant, spec.sp_size)
            restorer = self._opener(spec)
            self._model = LoadedModel(spec, restorer)
            _set_compiled(restorer, spec.compile)
            return self._model

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Keep other jobs from switching models for a while (a job that may run two models in turn)."""
        with self._lock:
            yield

    @contextmanager
    def use(self, spec: ModelSpec) -> Iterator[LoadedModel]:
        """Hold the model for the duration of one job."""
        with self._lock:
            yield self.ensure(spec)
