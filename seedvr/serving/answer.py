"""The JSON answers of `initialize` and `restore`, and the contract's legacy aliases, in one place.

A restore answer names the model that ran, the media (inline base64 in `media`, or `media_urls`), the
legacy `videos` alias when every item is a video, and `processing_info` (the sampling options, and per item
its plan, retries and timings).
"""

from dataclasses import dataclass, field

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


def _delivered(result: ItemResult) -> Delivered:
    assert result.delivered is not None, "every item is delivered before the answer"
    return result.delivered


def restore_answer(spec: RestoreSpec, model: LoadedModel, results: list[ItemResult], total_s: float) -> dict:
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
    if set(kinds) == {"video"}:
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
        "preset": spec.preset,
    }
    if len(results) == 1:
        info.update(results[0].info)
        info["timings"]["total"] = round(total_s, 4)
    else:
        info["items"] = [result.info for result in results]
        info["timings"] = {"total": round(total_s, 4)}
    answer["processing_info"] = info
    answer.update(_random_weights(model))
    return answer
