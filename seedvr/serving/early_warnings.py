"""The warnings a restore job can give before the work, so that the client can cancel it early.

    warnings = early_warnings(spec, items, sizes)   # strings; logged, sent with every progress update, answered

- An answer that will surely not fit: the results must travel inline (seedvr.io.delivery.inline_forced) and a low
  estimate of their base64 (seedvr.io.forecast) is already over the inline limit. Valid work is never refused on
  an estimate: the job runs, and ends in OUTPUT_TOO_LARGE only if the real result does not fit.
- Transparency the output drops: an image with alpha written as jpeg, or a video whose pixel format has alpha
  (restored videos are opaque).
"""

import logging

from seedvr import settings
from seedvr.engine.sizing import ItemSize
from seedvr.io.delivery import InlineBudget, inline_bytes, inline_risk
from seedvr.io.forecast import least_comparison_bytes, least_image_bytes, least_video_bytes, video_has_alpha
from seedvr.io.inputs import InputItem
from seedvr.io.media.encoders import container_for, container_mime
from seedvr.io.media.image import image_mime, keeps_alpha
from seedvr.io.outputs import SMALLER_COMPARISON, SMALLER_IMAGE, SMALLER_VIDEO
from seedvr.serving.answer import result_copies
from seedvr.serving.specs import RestoreSpec

log = logging.getLogger(__name__)

ALPHA_FORMATS = "png or webp"  # the image formats that keep it (seedvr.io.media.image.KEEPS_ALPHA)


def early_warnings(spec: RestoreSpec, items: list[InputItem], sizes: list[ItemSize]) -> list[str]:
    """Every warning the request earns before the work, each logged once."""
    warnings = [*dropped_alpha(spec, items)]
    oversized = answer_too_large(spec, items, sizes)
    if oversized:
        warnings.append(oversized)
    for text in warnings:
        log.warning("%s", text)
    return warnings


def dropped_alpha(spec: RestoreSpec, items: list[InputItem]) -> list[str]:
    """One warning per item whose transparency the output cannot carry."""
    warnings = []
    for item in items:
        where = f"{item.field}: " if len(items) > 1 else ""
        if item.image is not None and item.image.alpha is not None and not keeps_alpha(spec.image.format):
            warnings.append(f"{where}the input's transparency is dropped: {spec.image.format} has no alpha; "
                            f"use {ALPHA_FORMATS}")
        elif item.video is not None and video_has_alpha(item.video.pix_fmt):
            warnings.append(f"{where}the input video's transparency ({item.video.pix_fmt}) is dropped: restored "
                            "videos are opaque")
    return warnings


def answer_too_large(spec: RestoreSpec, items: list[InputItem], sizes: list[ItemSize]) -> str | None:
    """A warning when the results must be inline and a low estimate of their base64 is over the limit."""
    budget = InlineBudget.from_settings(result_copies([item.kind for item in items]))
    data_uri = spec.delivery.return_data_uri
    least = 0
    kinds = set()
    for item, size in zip(items, sizes):
        if item.kind == "video":
            mime = container_mime(container_for(spec.video.codec, spec.video.container))
            file_bytes = least_video_bytes(spec.video, size.width, size.height, item.frame_count)
        else:
            mime = image_mime(spec.image.format)
            file_bytes = least_image_bytes(spec.image, size.width, size.height)
        least += budget.result_copies * inline_bytes(file_bytes, mime if data_uri else None)
        kinds.add(item.kind)
        if spec.compare:
            least += inline_bytes(least_comparison_bytes(size.width, size.height), "image/png" if data_uri else None)
    smaller = "; ".join([SMALLER_VIDEO] * ("video" in kinds) + [SMALLER_IMAGE] * ("image" in kinds) +
                        [SMALLER_COMPARISON] * spec.compare)
    return inline_risk(least, spec.delivery, budget, settings.current().bucket, smaller)
