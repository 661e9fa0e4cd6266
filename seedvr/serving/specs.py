"""A validated request as the small frozen specs each stage takes.

The schema (seedvr.serving.schema) checks the fields; `restore_spec` hands each stage only its part:

    media     -> seedvr.io.inputs.gather_inputs        (MediaSpec)
    model     -> the model holder                       (ModelChoice: None = what is warm)
    size      -> seedvr.engine.sizing.item_size         (SizeWishes; the item's size is computed once)
    memory    -> seedvr.engine.memory_plan.choose       (Wishes)
    sampling  -> the Restorer                           (Sampling)
    video / image -> seedvr.io.outputs                  (VideoEncoding / ImageEncoding)
    delivery  -> seedvr.io.outputs.deliver_output       (DeliverySpec)
    interpolation -> seedvr.serving.interpolation       (InterpolationSpec: after restoring, before encoding)
    fanout    -> seedvr.serving.fanout                 (FanOutSpec: workers, resume, a segment job's order)
"""

from dataclasses import dataclass

from seedvr.engine.memory_plan import Wishes
from seedvr.engine.restorer import Sampling
from seedvr.engine.sizing import SizeWishes
from seedvr.io.delivery import DeliverySpec
from seedvr.io.inputs import MediaSpec
from seedvr.io.outputs import ImageEncoding, VideoEncoding
from seedvr.serving.fanout.order import FanOutSpec, SegmentOrder
from seedvr.serving.interpolation import InterpolationSpec
from seedvr.serving.schema import InitializeRequest, RestoreRequest


@dataclass(frozen=True)
class ModelChoice:
    """The model a request asks for; a field left None means "what is warm" (seedvr.serving.model_holder)."""

    model_type: str | None = None
    variant: str | None = None
    sp_size: int | None = None
    attention_backend: str | None = None
    compile: bool | None = None
    upscaler: str | None = None  # with model_type "upscaler": the name of its file in ckpts/upscalers/


@dataclass(frozen=True)
class RestoreSpec:
    media: MediaSpec
    model: ModelChoice
    size: SizeWishes
    memory: Wishes
    sampling: Sampling
    video: VideoEncoding
    image: ImageEncoding
    delivery: DeliverySpec
    compare: bool = False  # a before/after picture per item
    preset: str | None = None  # reported back
    fanout: FanOutSpec = FanOutSpec()  # workers, resume, a segment job's order (seedvr.serving.fanout)
    interpolation: InterpolationSpec = InterpolationSpec()  # factor 1: none (seedvr.serving.interpolation)
    fallback_upscaler: str | None = None  # finishes an item SeedVR2 cannot (seedvr.serving.fallback)


def model_choice(request: InitializeRequest | RestoreRequest) -> ModelChoice:
    return ModelChoice(request.model_type, request.model_variant, request.sp_size, request.attention_backend,
                       request.compile, request.upscaler)


def restore_spec(request: RestoreRequest) -> RestoreSpec:
    max_resolution = request.max_resolution
    assert isinstance(max_resolution, tuple), "parse_request reads max_resolution as (width, height)"
    if request.scale is not None:
        size = SizeWishes(scale=request.scale, max_resolution=max_resolution)
    else:
        assert request.res_h is not None and request.res_w is not None, "the defaults are filled in"
        size = SizeWishes(request.res_h, request.res_w, max_resolution=max_resolution)
    return RestoreSpec(
        media=MediaSpec(request.media_field or "media", request.media_values, request.media_type,  # the CLI: no media
                        request.deinterlace, request.deinterlace_rate, request.start_time, request.duration),
        model=model_choice(request),
        size=size,
        memory=Wishes(request.chunk_frames, request.chunk_overlap, request.vae_tiling, request.vae_tile_size,
                      request.dit_offload),
        sampling=Sampling(request.seed, request.cfg_scale, request.cfg_rescale, request.sample_steps,
                          request.color_fix, request.cond_noise_scale),
        video=VideoEncoding(request.codec, request.crf, request.pix_fmt, request.container),
        image=ImageEncoding(request.format, request.quality),
        delivery=DeliverySpec(request.output_delivery, request.return_data_uri),
        compare=request.compare,
        preset=request.preset,
        fallback_upscaler=request.fallback_upscaler,
        fanout=FanOutSpec(request.workers, request.resume,
                          SegmentOrder.from_fields(request.segment) if request.segment is not None else None),
        interpolation=InterpolationSpec.of(request.interpolate_factor, request.interpolation),
    )
