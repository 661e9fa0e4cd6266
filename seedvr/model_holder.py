"""The one warm model of this worker.

A `ModelHolder` owns at most one loaded model. It is created lazily by the
first `initialize` or `restore`; a request for another model frees the current
one before loading the next, so two models never share the GPU. One lock
serialises loading and running: a job that switches models cannot free the
weights under a job still using them. With sp_size > 1 the model lives in a
group of rank processes (seedvr.parallel), held and switched the same way.
"""

import gc
import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from seedvr import loader, weights
from seedvr.errors import CheckpointError
from seedvr.loader import LoadedModel
from seedvr.parallel import SequenceParallelGroup
from seedvr.schema import DEFAULT_MODEL_TYPE

log = logging.getLogger(__name__)


class ModelHolder:
    def __init__(self):
        self._lock = threading.RLock()
        self._model: LoadedModel | None = None
        self._attention_backend = "auto"

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    def describe(self) -> dict:
        model = self._model
        if model is None:
            return {"model_initialized": False, "model_type": None, "model_variant": None}
        return {
            "model_initialized": True,
            "model_type": model.model_type,
            "model_variant": model.variant,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "sp_size": model.sp_size,
            "random_weights": model.random_weights,
        }

    def _wanted(self, model_type: str | None, variant: str) -> tuple[str, str]:
        if model_type is None:
            model_type = self._model.model_type if self._model else DEFAULT_MODEL_TYPE
        return model_type, variant

    def _release(self) -> None:
        if self._model is None:
            return
        log.info("releasing %s (%s)", self._model.model_type, self._model.variant)
        if isinstance(self._model.pipeline, SequenceParallelGroup):
            self._model.pipeline.close()
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _check_or_download(model_type: str, variant: str) -> None:
        try:
            loader.check_files(model_type, variant)
        except CheckpointError:
            if not weights.auto_download_enabled():
                raise
            log.info("SEEDVR_AUTO_DOWNLOAD=1: fetching %s (%s)", model_type, variant)
            weights.download(model_type + ("_sharp" if variant == "sharp" else ""))

    def ensure(self, model_type: str | None, variant: str = "normal", attention_backend: str = "auto",
               sp_size: int = 1) -> LoadedModel:
        """Load the requested model unless it is already the warm one."""
        with self._lock:
            model_type, variant = self._wanted(model_type, variant)
            current = self._model
            if current is not None and (current.model_type, current.variant, current.sp_size) == \
                    (model_type, variant, sp_size):
                self._set_attention_backend(current, attention_backend)
                return current
            self._check_or_download(model_type, variant)  # fail before freeing the warm model
            self._release()
            log.info("loading %s (%s), sp_size %d", model_type, variant, sp_size)
            if sp_size == 1:
                self._model = loader.load_model(model_type, variant, attention_backend=attention_backend)
            else:
                group = SequenceParallelGroup(model_type, variant, sp_size, attention_backend)
                info = group.model_info
                self._model = LoadedModel(model_type, variant, torch.device(info["device"]),
                                          getattr(torch, info["dtype"]), info["random_weights"], group, sp_size)
            return self._model

    @staticmethod
    def _set_attention_backend(model: LoadedModel, name: str) -> None:
        if isinstance(model.pipeline, SequenceParallelGroup):
            if model.pipeline.attention_backend != name:
                model.pipeline.set_attention_backend(name)
        else:
            model.pipeline.dit.attention_backend = name

    @contextmanager
    def use(self, model_type: str | None, variant: str = "normal", attention_backend: str = "auto",
            sp_size: int = 1) -> Iterator[LoadedModel]:
        """Hold the model for the duration of one job."""
        with self._lock:
            yield self.ensure(model_type, variant, attention_backend, sp_size)
