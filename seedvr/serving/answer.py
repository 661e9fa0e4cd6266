"""The JSON answers of `initialize` and `restore`, and the contract's legacy aliases, in one place.

A restore answer names the model that ran, the media (inline base64 in `media`, or `media_urls`), the
legacy `videos` alias when every item is a video, and `processing_info` (the sampling options, and per item
its plan, retries and timings).

`warnings`: a list of strings, present only when there is one (a client may test `answer.get("warnings")`).
It is where every warning of a restore job goes: those known before the work (seedvr.serving.early_warnings:
an answer that will not fit inline, transparency the output format drops), which progress updates carry too.
The one exception is older than the list: random weights are still announced as `random_weights: true` and
the single string `warning`, as they always were (and in the initialize answer).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from seedvr.engine.upscaler import UPSCALER
from seedvr.io.delivery import Delivered
from seedvr.io.outputs import OutputFile
from seedvr.serving.model_holder import LoadedModel
from seedvr.serving.specs import RestoreSpec

RANDOM_WEIGHTS_WARNING = ("random weights (python -m seedvr.tiny): the output is noise; "
                          "this answer only proves the plumbing")


@dataclass
class ItemResult:
    """One restored item, encoded in the job's folder; `delivered` / `compared` are set by delivery."""

    kind: str  # "video" | "image"
    width: int
    height: int
    output: OutputFile
    comparison: OutputFile | None
    info: dict = field(default_factory=dict)
    delivered: Delivered | None = None
    compared: Delivered | None = None

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"


def _model_fields(model: LoadedModel) -> dict:
    return {"model_type": model.model_type, "model_variant": model.variant}


def _random_weights(model: LoadedModel) -> dict:
    return {"random_weights": True, "warning": RANDOM_WEIGHTS_WARNING} if model.random_weights else {}


def initialize_answer(model: LoadedModel) -> dict:
    return {
        "message": f"Model {model.model_type} ({model.variant}) initialized successfully",
        **_model_fields(model),
        "sp_size": model.sp_size,
        "attention_backend": model.restorer.attention_backend,
        "compile": model.restorer.compiled,
        "ready": True,
        **_random_weights(model),
    }


def result_copies(kinds: Sequence[str]) -> int:
    """How many times a restore answer carries each result: twice when every item is a video (`media` and its
    legacy alias `videos`, the same list serialised twice), else once. Inline text counts that many times."""
    return 2 if set(kinds) == {"video"} else 1


def _delivered(result: ItemResult) -> Delivered:
    assert result.delivered is not None, "every item is delivered before the answer"
    return result.delivered


def restore_answer(spec: RestoreSpec, model: LoadedModel, results: list[ItemResult], total_s: float,
                   warnings: Sequence[str] = ()) -> dict:
    kinds = [result.kind for result in results]
    delivered = [_delivered(result) for result in results]
    answer: dict = {
        "success": True,
        "media": [d.value if d.kind == "base64" else None for d in delivered],
        "media_type": kinds[0] if len(set(kinds)) == 1 else "mixed",
        **_model_fields(model),
        "resolution": results[0].resolution,
    }
    if any(d.kind == "url" for d in delivered):
        answer["media_urls"] = [d.value if d.kind == "url" else None for d in delivered]
    if result_copies(kinds) == 2:
        answer["videos"] = answer["media"]  # the contract's legacy name
    if len(results) > 1:
        answer["media_types"] = kinds
        answer["resolutions"] = [result.resolution for result in results]
    if spec.compare:
        answer["compare"] = [result.compared.value if result.compared else None for result in results]
    sampling = spec.sampling
    info: dict = {
        "seed": sampling.seed,
        "cfg_scale": sampling.cfg_scale,
        "cfg_rescale": sampling.cfg_rescale,
        "sample_steps": sampling.sample_steps,
        "sequence_parallel_size": model.sp_size,
        "attention_backend": model.restorer.attention_backend,
        "compile": model.restorer.compiled,
        "color_fix": sampling.color_fix,
        "cond_noise_scale": sampling.cond_noise_scale,
        "preset": spec.preset,
    }
    if model.model_type == UPSCALER:  # no diffusion ran: the upscaler's name instead of the sampling options
        info = {"upscaler": model.variant, "compile": model.restorer.compiled}
    if len(results) == 1:
        info.update(results[0].info)
        info["timings"]["total"] = round(total_s, 4)
    else:
        info["items"] = [result.info for result in results]
        info["timings"] = {"total": round(total_s, 4)}
    answer["processing_info"] = info
    if warnings:
        answer["warnings"] = list(warnings)
    answer.update(_random_weights(model))
    return answer
