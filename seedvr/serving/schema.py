"""Every field a client may send, declared once, and the validation of `job["input"]`.

Each action's request is a frozen dataclass whose fields are the table: `option(default, accepts, doc)`
declares one field, so adding a field is adding one line, and the parsing code stays as it is.
`parse_request` checks each field, then the action's rules (checks across fields), and reports every
problem in one INVALID_INPUT error. `describe()` renders the table as Markdown for the README.

JSON types are strict: booleans are not numbers, numbers inside strings ("720") are not numbers, NaN and
infinities are rejected. Integer fields also take a float with an integral value (720.0, as some JSON
encoders write every number as a float), never 720.5; float fields take integers. `null` is accepted
only where the default is null, and means "not given".
"""

import dataclasses
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

from seedvr import settings
from seedvr.engine.colorfix import METHODS as COLOR_FIXES
from seedvr.engine.upscaler import UPSCALER
from seedvr.errors import INVALID_INPUT, RestoreError, excerpt
from seedvr.io.media.encoders import CODECS, CONTAINERS, PIXEL_FORMATS, container_for, crf_problem
from seedvr.io.media.interpolation import MAX_FACTOR
from seedvr.models.attention import BACKENDS as ATTENTION_BACKENDS
from seedvr.models.registry import MAX_HEADS, MODEL_TYPES, VARIANTS, sp_size_problem, variant_problem
from seedvr.serving.fanout.order import MAX_FRAMES, MAX_WORKERS, SEGMENT_NUMBERS
from seedvr.serving.fanout.order import RULES as FANOUT_RULES
from seedvr.serving.field_types import (
    MAX_SIDE,
    MIN_SIDE,
    Boolean,
    Choice,
    Field,
    Integer,
    NonEmptyString,
    Number,
    Record,
    Rejected,
    Resolution,
    Strings,
    did_you_mean,
    option,
)
from seedvr.serving.interpolation import METHODS as INTERPOLATION_METHODS
from seedvr.serving.interpolation import RULES as INTERPOLATION_RULES
from seedvr.serving.upscaler_rules import RULES as UPSCALER_RULES

ACTIONS = ("health", "initialize", "restore")
MEDIA_FIELDS = ("media", "video", "image")  # `video` and `image` are the legacy names
MEDIA_TYPES = ("auto", "video", "image")
MAX_ITEMS = 16  # media items in one job (a list in `media` or `media_url`)
MAX_SECONDS = 86400.0  # start_time / duration: a day of video
DEINTERLACE_MODES = ("auto", "on", "off")
DEINTERLACE_RATES = ("frame", "field")
PRESETS = {  # preset -> (model_type, (res_h, res_w)); explicit fields win over the preset
    "fast": ("seedvr2_3b", (480, 854)),
    "balanced": ("seedvr2_3b", (1280, 720)),
    "quality": ("seedvr2_7b", (1920, 1080)),
}
DEFAULT_RESOLUTION = (1280, 720)  # res_h, res_w of the contract (an area: 921,600 pixels)
DELIVERIES = ("auto", "base64", "url")
IMAGE_FORMATS = ("png", "jpeg", "webp")
MAX_CHUNK_FRAMES = 10_001  # bound of chunk_frames and chunk_overlap
TILE_MULTIPLE = 16  # vae_tile_size must divide by it
MAX_PROBLEMS_SHOWN = 4  # keeps the error message short when a request is wrong everywhere
MAX_NAMES_SHOWN = 3  # unknown field names quoted in one message
MAX_VALID_SHOWN = 8  # valid field names listed after an unknown one
REQUIRED = object()  # the default of a field the client must send


ACTION_FIELD = Field("action", Choice(ACTIONS), REQUIRED, "what to do: health, initialize or restore")


# Rules: checks across fields. A rule's parameters are named after the fields it reads (a parameter with a
# default may name a field another action lacks); it runs only when all of them are valid, and returns a
# problem or None. A request that names no model is checked against the warm one later (the model holder).
def _named_model(model_type: str | None, preset: str | None = None) -> tuple[str | None, str]:
    """The model a request names (itself or through its preset), and the note that says which way."""
    if model_type:
        return model_type, ""
    if preset:
        return PRESETS[preset][0], f" (preset {preset!r}, as model_type is not given)"
    return None, ""


def variant_exists(model_type: str | None, model_variant: str | None, preset: str | None = None) -> str | None:
    model, why = _named_model(model_type, preset)
    if model is None or model == UPSCALER or model_variant is None:  # an upscaler: upscaler_rules
        return None
    return variant_problem(model, model_variant, why)


def sp_size_divides_heads(model_type: str | None, sp_size: int | None, preset: str | None = None) -> str | None:
    model, why = _named_model(model_type, preset)
    if model is None or model == UPSCALER or sp_size is None:
        return None
    return sp_size_problem(model, sp_size, why)


def one_media_field(media: tuple | None, video: str | None, image: str | None, media_url: tuple | None) -> str | None:
    given = [name for name, value in zip(MEDIA_FIELDS + ("media_url",), (media, video, image, media_url))
             if value is not None]
    if not given:
        return "No media provided: send base64 in `media` (or legacy `video`/`image`), or a URL in `media_url`"
    if len(given) > 1:
        return f"media sent in {' and '.join(f'`{name}`' for name in given)}: send it in one field only"
    return None


def legacy_field_agrees_with_media_type(video: str | None, image: str | None, media_type: str) -> str | None:
    for name, value in (("video", video), ("image", image)):
        if value is not None and media_type not in ("auto", name):
            return f"media_type {media_type!r} contradicts the legacy `{name}` field: send the media in `media`"
    return None


def output_area_within_cap(res_h: int | None, res_w: int | None) -> str | None:
    """An explicit area over the worker's cap is refused; max_resolution and scale are soft caps, applied later."""
    cap = settings.current().max_output_area
    res_h, res_w = res_h or DEFAULT_RESOLUTION[0], res_w or DEFAULT_RESOLUTION[1]
    if res_h * res_w > cap:
        return f"res_h*res_w must be at most {cap} pixels, got {res_h}*{res_w} = {res_h * res_w}"
    return None


def scale_or_resolution(scale: float | None, res_h: int | None, res_w: int | None) -> str | None:
    if scale is not None and (res_h is not None or res_w is not None):
        return "send either scale or res_h/res_w, not both"
    return None


def crf_in_codec_range(codec: str, crf: int | None) -> str | None:
    return crf_problem(codec, crf)


def container_holds_codec(codec: str, container: str | None) -> str | None:
    try:
        container_for(codec, container)
    except ValueError as error:
        return f"container: {error}"
    return None


def chunk_frames_are_4n_plus_1(chunk_frames: int | None) -> str | None:
    if chunk_frames is None or chunk_frames % 4 == 1:
        return None
    lower = chunk_frames - (chunk_frames - 1) % 4
    return f"chunk_frames must be 4n+1 (5, 9, 13, ...), got {chunk_frames}: use {max(lower, 5)} or {lower + 4}"


def overlap_shorter_than_chunk(chunk_frames: int | None, chunk_overlap: int | None) -> str | None:
    if chunk_frames is None or chunk_overlap is None or chunk_overlap < chunk_frames:
        return None
    return f"chunk_overlap must be less than chunk_frames ({chunk_frames}), got {chunk_overlap}"


def tile_size_fits_tiling(vae_tiling: bool | None, vae_tile_size: int | None) -> str | None:
    if vae_tile_size is None:
        return None
    if vae_tiling is False:
        return "vae_tile_size asks for tiles but vae_tiling is false: drop one of them"
    if vae_tile_size % TILE_MULTIPLE:
        return f"vae_tile_size must be a multiple of {TILE_MULTIPLE}, got {vae_tile_size}"
    return None


# The requests: one frozen dataclass per action; its fields are the table.
@dataclass(frozen=True)
class HealthRequest:
    action: ClassVar[str] = "health"
    rules: ClassVar[tuple[Callable, ...]] = ()


@dataclass(frozen=True)
class ModelOptions:
    """Which model serves the request; shared by initialize and restore."""

    rules: ClassVar[tuple[Callable, ...]] = (variant_exists, sp_size_divides_heads) + UPSCALER_RULES

    model_type: str | None = option(
        None, Choice((*MODEL_TYPES, UPSCALER)), "which DiT, or upscaler: the classic upscaler named in `upscaler`; "
                                                "null = the warm DiT (seedvr2_3b when none is warm, or the one that "
                                                "has model_variant)")
    model_variant: str | None = option(
        None, Choice(VARIANTS), "checkpoint variant, sharp only for seedvr2_7b; null = the warm one's when the "
                                "model stays, else normal")
    sp_size: int | None = option(
        None, Integer(1, MAX_HEADS), "sequence-parallel GPUs, must divide the heads (3B 20, 7B 24); null = the warm "
                                     "model's, else 1")
    attention_backend: str | None = option(
        None, Choice(ATTENTION_BACKENDS), "attention kernel, auto = flash when usable, else sdpa; null = the warm "
                                          "model's, else auto")
    compile: bool | None = option(
        None, Boolean(), "torch.compile the DiT blocks (regional, no CUDA graphs; compiled and warmed up when the "
                         "model loads, same frames as eager); null = the warm model's, else SEEDVR_COMPILE (off)")
    upscaler: str | None = option(
        None, NonEmptyString(), "with model_type upscaler: which one, by the name of its file NAME.pth or "
                                "NAME.safetensors in the weights folder's upscalers/ (health lists them); any model "
                                "spandrel loads (ESRGAN, Real-ESRGAN, SPAN, SwinIR, HAT, DAT, OmniSR, ...)")


@dataclass(frozen=True)
class InitializeRequest(ModelOptions):
    action: ClassVar[str] = "initialize"


@dataclass(frozen=True)
class RestoreRequest(ModelOptions):
    """After `parse_request` exactly one of media/video/image is set: read `media_value` and `media_field`.
    A legacy `video`/`image` field implies the media type: `media_type` "auto" is resolved from it."""

    action: ClassVar[str] = "restore"
    rules: ClassVar[tuple[Callable, ...]] = ModelOptions.rules + (
        one_media_field, legacy_field_agrees_with_media_type, scale_or_resolution, output_area_within_cap,
        crf_in_codec_range, container_holds_codec, chunk_frames_are_4n_plus_1, overlap_shorter_than_chunk,
        tile_size_fits_tiling) + FANOUT_RULES + INTERPOLATION_RULES

    # Input. Media payloads can be hundreds of MB: they stay out of repr() and thus out of logs.
    media: tuple[str, ...] | None = option(
        None, Strings(MAX_ITEMS), "the input video(s) or image(s), base64 or data URI; a list restores each in turn",
        in_repr=False)
    video: str | None = option(None, NonEmptyString(), "legacy `media`; implies media_type video", in_repr=False)
    image: str | None = option(None, NonEmptyString(), "legacy `media`; implies media_type image", in_repr=False)
    media_url: tuple[str, ...] | None = option(
        None, Strings(MAX_ITEMS), "http(s) URL(s) of the input instead of base64 (for inputs over RunPod's "
                                  "10/20 MB request limit)", in_repr=False)
    media_type: str = option("auto", Choice(MEDIA_TYPES), "what the media is; auto = detect from the bytes")
    start_time: float | None = option(None, Number(0.0, MAX_SECONDS),
                                      "videos: restore only from this many seconds in (a preview, to judge settings "
                                      "before paying for the whole clip); the audio is cut to match")
    duration: float | None = option(None, Number(0.001, MAX_SECONDS),
                                    "videos: restore only this many seconds (from start_time); null = to the end")
    deinterlace: str = option("auto", Choice(DEINTERLACE_MODES),
                              "interlaced video (VHS, DVD, camcorder): auto = deinterlace (bwdif) when ffmpeg's "
                              "idet finds interlacing in the first 2 s; on = always; off = never")
    deinterlace_rate: str = option("frame", Choice(DEINTERLACE_RATES),
                                   "frame = one frame per interlaced frame; field = one per field (twice the frames "
                                   "and the frame rate, smoother motion)")
    # What to make
    preset: str | None = option(None, Choice(tuple(PRESETS)),
                                "fast = 3B at 854x480 area, balanced = 3B at 1280x720, quality = 7B at 1920x1080; "
                                "explicit model_type/res_h/res_w/scale win")
    fallback_upscaler: str | None = option(
        None, NonEmptyString(), "an upscaler (as `upscaler`) that finishes each item SeedVR2 cannot: every memory "
                                "plan ran out of memory, or its weights are missing; processing_info.fallback says "
                                "so, with the reason")
    res_h: int | None = option(None, Integer(MIN_SIDE, MAX_SIDE),
                               "with res_w, sets the output AREA res_h*res_w (default 1280*720, or the preset's); "
                               "the aspect ratio follows the input")
    res_w: int | None = option(None, Integer(MIN_SIDE, MAX_SIDE),
                               "see res_h (the official script's rule); default 720")
    scale: float | None = option(None, Number(0.25, 8.0),
                                 "instead of res_h/res_w: output area = input area * scale^2")
    max_resolution: tuple[int, int] | str = option(
        "3840x2160", Resolution(), "caps the output area at WIDTH*HEIGHT (the result is scaled down to fit); "
                                   "read as (width, height)")
    seed: int = option(666, Integer(0, 2**32 - 1), "seed of the diffusion noise")
    cfg_scale: float = option(1.0, Number(0.0, 20.0), "classifier-free guidance scale; 1.0 = no guidance (one step)")
    cfg_rescale: float = option(0.0, Number(0.0, 1.0), "guidance rescale factor")
    sample_steps: int = option(1, Integer(1, 50), "diffusion steps; SeedVR2 is trained for 1")
    color_fix: str = option("wavelet", Choice(COLOR_FIXES), "match the output colours to the input")
    cond_noise_scale: float = option(
        0.0, Number(0.0, 1.0), "restoration strength: noise mixed into the input's latent before the DiT (SeedVR2's "
                               "condition noise); 0 = the official output, higher = trusts the input less and "
                               "generates more detail (for heavily degraded input; can invent detail on clean input)")
    interpolate_factor: float = option(
        1.0, Number(1.0, MAX_FACTOR), "videos: frame interpolation after restoration, 1 = off; at most two decimals "
                                      "(2.5). The rate is multiplied exactly (30000/1001 x 2 = 60000/1001) and N frames "
                                      "become ceil(factor*N) (2N at 2), lasting as long as the source; the audio is "
                                      "untouched")
    interpolation: str = option(
        "auto", Choice(INTERPOLATION_METHODS), "how interpolate_factor makes frames: rife = RIFE 4.13 on the GPU (needs "
                                               "`python -m seedvr.weights download --model rife`), mci = ffmpeg's "
                                               "motion-compensated minterpolate (no weights); auto = rife when its "
                                               "weights are present, else mci. Scene cuts are never blended")
    # How to return it
    output_delivery: str = option("auto", Choice(DELIVERIES),
                                  "auto = base64 under 15 MB else an S3 URL (needs BUCKET_* env); base64; url")
    return_data_uri: bool = option(False, Boolean(), "base64 results as data URIs (data:video/mp4;base64,...)")
    compare: bool = option(False, Boolean(), "also return a side-by-side before/after PNG (a video's middle frame)")
    codec: str = option("h264", Choice(tuple(CODECS)), "video codec (NVENC when the GPU offers it); prores = "
                                                       "ProRes 422 HQ (4444 for the yuv444 pix_fmts), ffv1 = "
                                                       "lossless FFV1")
    crf: int | None = option(None, Integer(0, 63), "video quality, lower = better; null = the codec's default "
                                                   "(h264 18, h265 20, vp9 30, av1 30); prores and ffv1 take none")
    pix_fmt: str = option("yuv420p", Choice(PIXEL_FORMATS),
                          "video pixel format (10-bit: yuv420p10le; no chroma loss: yuv444p, yuv444p10le); "
                          "prores stores yuv422p10le or yuv444p10le")
    container: str | None = option(None, Choice(tuple(CONTAINERS)),
                                   "video container; null = mp4 (webm for vp9, mov for prores, mkv for ffv1)")
    format: str = option("png", Choice(IMAGE_FORMATS), "image output format")
    quality: int = option(95, Integer(1, 100), "jpeg/webp quality")
    # Memory and long clips; null = the worker's memory plan chooses (processing_info.plan says what it chose)
    chunk_frames: int | None = option(
        None, Integer(5, MAX_CHUNK_FRAMES), "frames per temporal chunk, 4n+1; a clip longer than this is restored "
                                            "in overlapping chunks, cross-faded; null = the whole clip in one pass "
                                            "(official) up to 121 frames (SEEDVR_MAX_CHUNK_FRAMES) while it fits, "
                                            "else the longest chunk that fits")
    chunk_overlap: int | None = option(
        None, Integer(0, MAX_CHUNK_FRAMES - 1), "frames shared by neighbouring chunks, cross-faded; less than "
                                                "chunk_frames; null = about a quarter of the chunk, at most 9")
    vae_tiling: bool | None = option(
        None, Boolean(), "VAE in overlapping spatial tiles (approximate: seams can show on detailed content); "
                         "null = only when a frame does not fit otherwise, false = never")
    vae_tile_size: int | None = option(
        None, Integer(64, MAX_SIDE), f"VAE tile side in output pixels, a multiple of {TILE_MULTIPLE}; implies "
                                     "vae_tiling; null = 512, then 256")
    dit_offload: bool | None = option(
        None, Boolean(), "keep the DiT blocks in host memory, each moved to the GPU in turn (exact, a little "
                         "slower); null = only when needed")
    workers: int = option(1, Integer(1, MAX_WORKERS), "videos: restore on this many workers of this endpoint at once, "
                          "merged seamlessly (the frames of one worker); needs a bucket (seedvr.serving.fanout)")
    resume: bool = option(True, Boolean(), "workers > 1: reuse segments a failed run of this job left (24 h)")
    segment: dict | None = option(None, Record("internal", tuple((name, Integer(0, MAX_FRAMES)) for name in SEGMENT_NUMBERS)
                                               + (("source_sha256", NonEmptyString()),)), "a coordinator's segment job")

    def __post_init__(self) -> None:  # the dataclass is frozen: resolved values are set with object.__setattr__
        implied = self.media_field if self.media_field in ("video", "image") else None
        if self.media_type == "auto" and implied:
            object.__setattr__(self, "media_type", implied)
        if self.preset and self.model_type is None:
            object.__setattr__(self, "model_type", PRESETS[self.preset][0])
        if self.scale is None:  # res_h / res_w not given take the preset's or the contract's
            res_h, res_w = PRESETS[self.preset][1] if self.preset else DEFAULT_RESOLUTION
            object.__setattr__(self, "res_h", self.res_h or res_h)
            object.__setattr__(self, "res_w", self.res_w or res_w)
        if isinstance(self.max_resolution, str):
            object.__setattr__(self, "max_resolution", Resolution().read(self.max_resolution))

    @property
    def media_field(self) -> str | None:
        """Which field carried the media: "media", "media_url", or the legacy "video" / "image"."""
        return next((name for name in MEDIA_FIELDS + ("media_url",) if getattr(self, name) is not None), None)

    @property
    def media_values(self) -> tuple[str, ...]:
        """The media strings as sent (base64 or URLs, not yet decoded), one per item."""
        value = getattr(self, self.media_field) if self.media_field else None
        return (value,) if isinstance(value, str) else (value or ())


Request = HealthRequest | InitializeRequest | RestoreRequest
REQUEST_TYPES: dict[str, type[HealthRequest] | type[InitializeRequest] | type[RestoreRequest]] = {
    request.action: request for request in get_args(Request)}


def _table_of(request_type: type) -> tuple[Field, ...]:
    rows = [Field(field.name, field.metadata["accepts"], field.default, field.metadata["doc"])
            for field in dataclasses.fields(request_type)]
    return (ACTION_FIELD, *rows)


TABLE: dict[str, tuple[Field, ...]] = {action: _table_of(REQUEST_TYPES[action]) for action in ACTIONS}


# Parsing
def _show(value: Any) -> str:
    """A short rendering of a client value: strings are quoted and cut, never echoed whole."""
    if isinstance(value, str):
        return excerpt(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return json.dumps(value)  # true, null, 720.5, NaN
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large integer"
    kinds: dict[type, str] = {dict: "an object", list: "a list"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _read(field: Field, job_input: dict) -> tuple[Any, str | None]:
    """(value, None) or (None, problem)."""
    if field.name not in job_input:
        if field.default is REQUIRED:
            return None, f"{field.name} is required: {field.accepts.describe()}"
        return field.default, None
    value = job_input[field.name]
    if value is None and field.default is None:
        return None, None
    try:
        return field.accepts.read(value), None
    except Rejected as rejected:
        return None, f"{field.name} must be {field.accepts.describe()}, got {_show(value)}{rejected}"


def _unknown_fields_problem(job_input: dict, action: str) -> str | None:
    valid = [field.name for field in TABLE[action]]
    unknown = [name for name in job_input if name not in valid]
    if not unknown:
        return None
    shown, lacks_suggestion = [], False
    for name in unknown[:MAX_NAMES_SHOWN]:
        owners = [other for other in ACTIONS if any(field.name == name for field in TABLE[other])]
        hint = f" (only for {', '.join(owners)})" if owners else did_you_mean(name, valid)
        lacks_suggestion = lacks_suggestion or bool(owners) or not hint
        shown.append(_show(name) + hint)
    if len(unknown) > MAX_NAMES_SHOWN:
        shown.append(f"and {len(unknown) - MAX_NAMES_SHOWN} more")
    problem = f"unknown field{'s' if len(unknown) > 1 else ''} for action {action!r}: {', '.join(shown)}"
    if not lacks_suggestion:
        return problem
    listed = ", ".join(valid[:MAX_VALID_SHOWN]) + (", ... (see the README)" if len(valid) > MAX_VALID_SHOWN else "")
    return f"{problem}; valid fields: {listed}"


def _invalid_input(problems: list[str]) -> RestoreError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        shown.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
    return RestoreError(INVALID_INPUT, "; ".join(shown))


def parse_request(job_input: Any, *, media_required: bool = True) -> Request:
    """Validate `job["input"]`; RestoreError(INVALID_INPUT) lists every problem (field, what it accepts).

    media_required=False: a restore request whose media come from elsewhere (the command line's files).
    """
    if not isinstance(job_input, dict):
        raise _invalid_input([f"input must be a JSON object with an `action` field, got {_show(job_input)}"])
    action, problem = _read(ACTION_FIELD, job_input)
    if problem:
        raise _invalid_input([problem])
    request_type = REQUEST_TYPES[action]
    problems = [problem] if (problem := _unknown_fields_problem(job_input, action)) else []
    values, invalid = {}, set()
    for field in TABLE[action][1:]:
        values[field.name], problem = _read(field, job_input)
        if problem:
            problems.append(problem)
            invalid.add(field.name)
    for rule in request_type.rules:
        if rule is one_media_field and not media_required:
            continue
        reads = inspect.signature(rule).parameters
        given = {name: values[name] for name in reads if name in values}  # a rule may default what an action lacks
        if invalid.isdisjoint(reads) and (problem := rule(**given)):
            problems.append(problem)
    if problems:
        raise _invalid_input(problems)
    return request_type(**values)


def describe() -> str:
    """Every action's fields as Markdown tables: name, what it accepts, default, doc."""
    lines = []
    for action, table in TABLE.items():
        lines += [f"### `{action}`", "", "| field | accepts | default | description |", "|---|---|---|---|"]
        for field in table:
            if field.default is REQUIRED:
                default = "required"
            else:
                default = f"`{json.dumps(field.default)}`"
            lines.append(f"| `{field.name}` | {field.accepts.describe()} | {default} | {field.doc} |")
        lines.append("")
    return "\n".join(lines)
