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
import difflib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, get_args

from seedvr.errors import INTERNAL, INVALID_INPUT, RestoreError, excerpt

ACTIONS = ("health", "initialize", "restore")
MODEL_TYPES = ("seedvr2_3b", "seedvr2_7b")
DEFAULT_MODEL_TYPE = "seedvr2_3b"  # what the checks assume when a request leaves model_type out
VARIANTS = ("normal", "sharp")
MODEL_VARIANTS = {"seedvr2_3b": ("normal",), "seedvr2_7b": ("normal", "sharp")}
ATTENTION_HEADS = {"seedvr2_3b": 20, "seedvr2_7b": 24}  # DiT heads (of 128 dims): sp_size must divide them
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
MEDIA_FIELDS = ("media", "video", "image")  # `video` and `image` are the legacy names
MEDIA_TYPES = ("auto", "video", "image")
COLOR_FIXES = ("wavelet", "adain", "none")
MIN_SIDE, MAX_SIDE = 16, 8192  # bounds of res_h and res_w, in pixels
DEFAULT_MAX_OUTPUT_AREA = 3840 * 2160  # 4K UHD; the env SEEDVR_MAX_OUTPUT_AREA overrides it
MAX_PROBLEMS_SHOWN = 4  # keeps the error message short when a request is wrong everywhere
MAX_NAMES_SHOWN = 3  # unknown field names quoted in one message
REQUIRED = object()  # the default of a field the client must send


class Rejected(Exception):
    """A value the field does not take; its text, if any, suggests a fix."""


# What a field accepts: `describe()` ends "<field> must be ...", `read()` returns the value to store or raises Rejected.
@dataclass(frozen=True)
class Integer:
    minimum: int
    maximum: int

    def describe(self) -> str:
        return f"an integer between {self.minimum} and {self.maximum}"

    def read(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():  # False for NaN and infinities
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise Rejected()
        return value


@dataclass(frozen=True)
class Number:
    minimum: float
    maximum: float

    def describe(self) -> str:
        return f"a number between {self.minimum} and {self.maximum}"

    def read(self, value: Any) -> float:
        # Comparing before converting: NaN fails every comparison, and a huge integer cannot overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.minimum <= value <= self.maximum:
            raise Rejected()
        return float(value)


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.options)

    def read(self, value: Any) -> str:
        if isinstance(value, str) and value in self.options:
            return value
        raise Rejected(_did_you_mean(value, self.options))


@dataclass(frozen=True)
class NonEmptyString:
    def describe(self) -> str:
        return "a non-empty string"

    def read(self, value: Any) -> str:
        if not isinstance(value, str) or not value or value.isspace():
            raise Rejected()
        return value


def option(default: Any, accepts: Integer | Number | Choice | NonEmptyString, doc: str, *, in_repr: bool = True):
    """Declare a request field: its default, what it accepts and a one-line doc."""
    return dataclasses.field(default=default, repr=in_repr, metadata={"accepts": accepts, "doc": doc})


@dataclass(frozen=True)
class Field:
    """One row of the table."""

    name: str
    accepts: Integer | Number | Choice | NonEmptyString
    default: Any  # REQUIRED when the client must send it
    doc: str


ACTION_FIELD = Field("action", Choice(ACTIONS), REQUIRED, "what to do: health, initialize or restore")


# Rules: checks across fields. A rule's parameters are named after the fields it reads; it runs only
# when all of them are valid, and returns a problem or None.
def _assumed_model(model_type: str | None) -> tuple[str, str]:
    """The model the checks hold a request to, and the note that says so when it was not given."""
    return (model_type, "") if model_type else (DEFAULT_MODEL_TYPE, " (the default, as model_type is not given)")


def variant_exists(model_type: str | None, model_variant: str) -> str | None:
    model, assumed = _assumed_model(model_type)
    if model_variant in MODEL_VARIANTS[model]:
        return None
    owners = [name for name, variants in MODEL_VARIANTS.items() if model_variant in variants]
    return f"model_variant {model_variant!r} exists only for {', '.join(owners)}, not {model}{assumed}"


def sp_size_divides_heads(model_type: str | None, sp_size: int) -> str | None:
    model, assumed = _assumed_model(model_type)
    heads = ATTENTION_HEADS[model]
    if heads % sp_size == 0:
        return None
    divisors = ", ".join(str(size) for size in range(1, heads + 1) if heads % size == 0)
    return f"sp_size must divide the {heads} attention heads of {model}{assumed}: one of {divisors}, got {sp_size}"


def one_media_field(media: str | None, video: str | None, image: str | None) -> str | None:
    given = [name for name, value in zip(MEDIA_FIELDS, (media, video, image)) if value is not None]
    if not given:
        return "No media provided: send base64 in `media` (or legacy `video`/`image`)"
    if len(given) > 1:
        return f"media sent in {' and '.join(f'`{name}`' for name in given)}: send it in `media` only"
    return None


def legacy_field_agrees_with_media_type(video: str | None, image: str | None, media_type: str) -> str | None:
    for name, value in (("video", video), ("image", image)):
        if value is not None and media_type not in ("auto", name):
            return f"media_type {media_type!r} contradicts the legacy `{name}` field: send the media in `media`"
    return None


def max_output_area() -> int:
    """The largest res_h·res_w a request may ask for: SEEDVR_MAX_OUTPUT_AREA, or 3840·2160."""
    raw = os.environ.get("SEEDVR_MAX_OUTPUT_AREA", "").strip()
    if not raw:
        return DEFAULT_MAX_OUTPUT_AREA
    area = int(raw) if raw.isascii() and raw.isdigit() else 0
    if area < MIN_SIDE * MIN_SIDE:
        raise RestoreError(INTERNAL, f"SEEDVR_MAX_OUTPUT_AREA must be an integer >= {MIN_SIDE**2}, got {excerpt(raw)}")
    return area


def output_area_within_cap(res_h: int, res_w: int) -> str | None:
    cap = max_output_area()
    if res_h * res_w <= cap:
        return None
    return f"res_h*res_w must be at most {cap} pixels, got {res_h}*{res_w} = {res_h * res_w}"


# The requests: one frozen dataclass per action; its fields are the table.
@dataclass(frozen=True)
class HealthRequest:
    action: ClassVar[str] = "health"
    rules: ClassVar[tuple[Callable, ...]] = ()


@dataclass(frozen=True)
class ModelOptions:
    """Which model serves the request; shared by initialize and restore."""

    rules: ClassVar[tuple[Callable, ...]] = (variant_exists, sp_size_divides_heads)

    model_type: str | None = option(
        None, Choice(MODEL_TYPES), f"which DiT; null = the warm one, else {DEFAULT_MODEL_TYPE} (checks assume it)")
    model_variant: str = option("normal", Choice(VARIANTS), "checkpoint variant; sharp exists only for seedvr2_7b")
    sp_size: int = option(
        1, Integer(1, max(ATTENTION_HEADS.values())), "sequence-parallel GPUs; must divide the heads (3B 20, 7B 24)")
    attention_backend: str = option(
        "auto", Choice(ATTENTION_BACKENDS), "attention kernel; auto = flash when usable, else sdpa")


@dataclass(frozen=True)
class InitializeRequest(ModelOptions):
    action: ClassVar[str] = "initialize"


@dataclass(frozen=True)
class RestoreRequest(ModelOptions):
    """After `parse_request` exactly one of media/video/image is set: read `media_value` and `media_field`.
    A legacy `video`/`image` field implies the media type: `media_type` "auto" is resolved from it."""

    action: ClassVar[str] = "restore"
    rules: ClassVar[tuple[Callable, ...]] = ModelOptions.rules + (
        one_media_field, legacy_field_agrees_with_media_type, output_area_within_cap)

    # Media payloads can be hundreds of MB: they stay out of repr() and thus out of logs.
    media: str | None = option(None, NonEmptyString(), "the input video or image, base64", in_repr=False)
    video: str | None = option(None, NonEmptyString(), "legacy `media`; implies media_type video", in_repr=False)
    image: str | None = option(None, NonEmptyString(), "legacy `media`; implies media_type image", in_repr=False)
    media_type: str = option("auto", Choice(MEDIA_TYPES), "what the media is; auto = detect from the bytes")
    res_h: int = option(1280, Integer(MIN_SIDE, MAX_SIDE),
                        "with res_w, sets the output AREA res_h*res_w; the aspect ratio follows the input")
    res_w: int = option(720, Integer(MIN_SIDE, MAX_SIDE),
                        "see res_h (the official script's rule); res_h*res_w <= SEEDVR_MAX_OUTPUT_AREA")
    seed: int = option(666, Integer(0, 2**32 - 1), "seed of the diffusion noise")
    cfg_scale: float = option(1.0, Number(0.0, 20.0), "classifier-free guidance scale; 1.0 = no guidance (one step)")
    cfg_rescale: float = option(0.0, Number(0.0, 1.0), "guidance rescale factor")
    sample_steps: int = option(1, Integer(1, 50), "diffusion steps; SeedVR2 is trained for 1")
    color_fix: str = option("wavelet", Choice(COLOR_FIXES), "match the output colours to the input")

    def __post_init__(self):
        implied = self.media_field if self.media_field in ("video", "image") else None
        if self.media_type == "auto" and implied:
            object.__setattr__(self, "media_type", implied)  # the dataclass is frozen

    @property
    def media_field(self) -> str | None:
        """Which field carried the media: "media", or the legacy "video" / "image"."""
        return next((name for name in MEDIA_FIELDS if getattr(self, name) is not None), None)

    @property
    def media_value(self) -> str | None:
        """The media string as sent (base64, not yet decoded)."""
        return getattr(self, self.media_field) if self.media_field else None


Request = HealthRequest | InitializeRequest | RestoreRequest
REQUEST_TYPES: dict[str, type] = {request.action: request for request in get_args(Request)}


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
    return {dict: "an object", list: "a list"}.get(type(value), f"a {type(value).__name__}")


def _did_you_mean(value: Any, candidates) -> str:
    if not isinstance(value, str) or len(value) > 64:
        return ""
    close = difflib.get_close_matches(value, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        hint = f" (only for {', '.join(owners)})" if owners else _did_you_mean(name, valid)
        lacks_suggestion = lacks_suggestion or bool(owners) or not hint
        shown.append(_show(name) + hint)
    if len(unknown) > MAX_NAMES_SHOWN:
        shown.append(f"and {len(unknown) - MAX_NAMES_SHOWN} more")
    problem = f"unknown field{'s' if len(unknown) > 1 else ''} for action {action!r}: {', '.join(shown)}"
    return problem + (f"; valid fields: {', '.join(valid)}" if lacks_suggestion else "")


def _invalid_input(problems: list[str]) -> RestoreError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        shown.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
    return RestoreError(INVALID_INPUT, "; ".join(shown))


def parse_request(job_input: Any) -> Request:
    """Validate `job["input"]`; RestoreError(INVALID_INPUT) lists every problem (field, what it accepts)."""
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
        reads = inspect.signature(rule).parameters
        if invalid.isdisjoint(reads) and (problem := rule(**{name: values[name] for name in reads})):
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
            default = "required" if field.default is REQUIRED else f"`{json.dumps(field.default)}`"
            lines.append(f"| `{field.name}` | {field.accepts.describe()} | {default} | {field.doc} |")
        lines.append("")
    return "\n".join(lines)
