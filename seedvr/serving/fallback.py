"""The models of one restore job: the one it asked for, and the `fallback_upscaler` that finishes an item that
model cannot.

SeedVR2 cannot restore an item when its weights are missing or unreadable (MODEL_NOT_AVAILABLE), when loading it
runs out of memory, or when every memory plan of the item ran out of memory (OUT_OF_MEMORY once the plan's
retries are spent). With a fallback upscaler the item is then restored by it, through the same sizing,
encoding and delivery, and its processing_info carries

    "fallback": {"upscaler": NAME, "instead_of": "seedvr2_7b", "reason": "OUT_OF_MEMORY: ..."}

(reason: the error the job would have answered without the fallback). Without one, errors go on as they are.

One model at a time is on the GPU (seedvr.serving.model_holder): the upscaler replaces SeedVR2 for the item,
and the next item loads SeedVR2 again, since an item that did not fit says nothing of the next one. A SeedVR2
that could not be loaded is not tried again within the job. The answer's model_type and model_variant name the
model that restored the last item.
"""

import logging
from collections.abc import Callable

import torch

from seedvr.engine.upscaler import UPSCALER
from seedvr.errors import OUT_OF_MEMORY, CheckpointError, RestoreError
from seedvr.serving.answer import ItemResult
from seedvr.serving.cancel import CancelToken
from seedvr.serving.model_holder import LoadedModel, ModelHolder, ModelSpec
from seedvr.serving.progress import Progress
from seedvr.serving.specs import ModelChoice, RestoreSpec

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 300  # of a torch out-of-memory message's first line


def fallback_spec(holder: ModelHolder, spec: RestoreSpec) -> ModelSpec | None:
    """The upscaler the request falls back to, resolved as a request for it would be; None without one."""
    if spec.fallback_upscaler is None:
        return None
    return holder.resolve(ModelChoice(model_type=UPSCALER, upscaler=spec.fallback_upscaler))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:MAX_REASON_CHARS]


class JobModels:
    """Loads the job's models in turn (the caller holds `holder.exclusive()`) and restores each item on one."""

    def __init__(self, holder: ModelHolder, requested: ModelSpec, fallback: ModelSpec | None, cancel: CancelToken):
        self.holder = holder
        self.requested = requested
        self.fallback = fallback
        self.cancel = cancel
        self._unavailable: str | None = None  # why the requested model could not be loaded
        self._last: LoadedModel | None = None  # the model that restored the last item
        self._interrupts = False

    def _interrupt(self) -> None:
        """Stop the job's model in flight (a group's ranks at once): the one the holder holds while the job runs.
        Through the holder, so that the token keeps no reference to a model swapped out (freed at the swap)."""
        model = self.holder.current
        if model is not None:
            model.restorer.interrupt()

    def _ensure(self, spec: ModelSpec) -> LoadedModel:
        model = self.holder.ensure(spec)
        if not self._interrupts:  # once a model of the job's is loaded, as the job holds the holder
            self._interrupts = True
            self.cancel.on_cancel(self._interrupt)
        return model

    @property
    def answering(self) -> LoadedModel:
        """The model the answer names: the one that restored the last item (each item says when it fell back)."""
        assert self._last is not None, "a job restores at least one item"
        return self._last

    def restore(self, progress: Progress, restore_one: Callable[[LoadedModel], ItemResult]) -> ItemResult:
        """restore_one(model) on the requested model; on the fallback upscaler when that one cannot."""
        self._last = None  # no reference of the job's keeps a model the holder swaps out
        if self.fallback is None:
            model = self._ensure(self.requested)
            result = restore_one(model)
            self._last = model
            return result
        frames_before = progress.frames_done
        reason = self._unavailable
        if reason is None:
            restored, reason = self._try_requested(restore_one)
            if restored is not None:
                return restored
        # Out of the except clauses: the failed attempt's tensors are unreachable; the swap below frees the model.
        log.warning("%s cannot restore the item (%s); finishing it with upscaler %s", self.requested.model_type,
                    reason, self.fallback.variant)
        progress.frames_done = frames_before  # the item starts over
        progress.phase("load_model")
        model = self._ensure(self.fallback)
        result = restore_one(model)
        self._last = model
        result.info["fallback"] = {"upscaler": self.fallback.variant, "instead_of": self.requested.model_type,
                                   "reason": reason}
        return result

    def _try_requested(self, restore_one: Callable[[LoadedModel], ItemResult]) -> tuple[ItemResult | None, str]:
        """(the item restored by the requested model, "") or (None, why it could not be)."""
        try:
            model = self._ensure(self.requested)
        except CheckpointError as error:
            self._unavailable = str(error)
            return None, self._unavailable
        except torch.OutOfMemoryError as error:
            self._unavailable = f"{OUT_OF_MEMORY}: loading {self.requested.model_type} ran out of memory " \
                                f"({_first_line(error)})"
            return None, self._unavailable
        try:
            result = restore_one(model)
        except RestoreError as error:
            if error.code != OUT_OF_MEMORY:
                raise
            return None, str(error)
        except torch.OutOfMemoryError as error:  # outside the memory plan (its retries answer OUT_OF_MEMORY)
            return None, f"{OUT_OF_MEMORY}: {_first_line(error)}"
        self._last = model
        return result, ""
