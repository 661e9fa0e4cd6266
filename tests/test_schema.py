"""Request validation: defaults from the API contract, every field's types and bounds, cross-field rules,
and error messages that name the field, say what it accepts and never echo a large value."""

import dataclasses
import math
from pathlib import Path

import pytest

from seedvr import settings
from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.models import registry
from seedvr.serving import schema
from seedvr.serving.schema import REQUIRED, HealthRequest, InitializeRequest, RestoreRequest, parse_request

REPO_ROOT = Path(__file__).resolve().parent.parent

# Written from seedvr-runpod-api.md and the brief, not read from schema.py.
CONTRACT_RESTORE_DEFAULTS = {
    "media_type": "auto", "res_h": 1280, "res_w": 720, "seed": 666, "cfg_scale": 1.0, "cfg_rescale": 0.0,
    "sample_steps": 1, "model_type": None, "model_variant": None, "sp_size": None, "attention_backend": None,
    "color_fix": "wavelet", "compile": None,
}  # absent model fields: the warm model's (the contract's "normal", 1, "auto" when none is warm; test_model_holder)
# issue 5's options, each with its default
DELIVERY_OPTIONS = {
    "media_url": None, "preset": None, "scale": None, "max_resolution": (3840, 2160), "output_delivery": "auto",
    "return_data_uri": False, "compare": False, "codec": "h264", "crf": None, "pix_fmt": "yuv420p", "container": None,
    "format": "png", "quality": 95,
}
# issue 4's memory options (null: the memory plan chooses)
MEMORY_OPTIONS = {"chunk_frames": None, "chunk_overlap": None, "vae_tiling": None, "vae_tile_size": None,
                  "dit_offload": None}
# issue 11's media options and issue 10's preview range
MEDIA_OPTIONS = {"deinterlace": "auto", "deinterlace_rate": "frame", "start_time": None, "duration": None}
# issue 12's restoration strength
STRENGTH_OPTIONS = {"cond_noise_scale": 0.0}
# the fan-out over workers (`segment` is what a coordinator sends the jobs it starts)
FANOUT_OPTIONS = {"workers": 1, "resume": True, "segment": None}
INTERPOLATION_OPTIONS = {"interpolate_factor": 1.0, "interpolation": "auto"}  # off (tests/test_interpolation.py)
# classic upscalers: the model of model_type "upscaler" (initialize and restore), SeedVR2's fallback (restore)
UPSCALER_OPTIONS = {"upscaler": None}
FALLBACK_OPTIONS = {"fallback_upscaler": None}
CONTRACT_INITIALIZE_DEFAULTS = {"model_type": None, "model_variant": None, "sp_size": None, "attention_backend": None,
                                "compile": None}
SP_SIZES = {"seedvr2_3b": {1, 2, 4, 5, 10, 20}, "seedvr2_7b": {1, 2, 3, 4, 6, 8, 12, 24}}
# (field, lowest accepted, highest accepted, just below, just above)
NUMERIC_BOUNDS = [
    ("res_h", 16, 8192, 15, 8193),
    ("res_w", 16, 8192, 15, 8193),
    ("seed", 0, 2**32 - 1, -1, 2**32),
    ("cfg_scale", 0.0, 20.0, -1e-9, 20.000001),
    ("cfg_rescale", 0.0, 1.0, -1e-9, 1.000001),
    ("sample_steps", 1, 50, 0, 51),
    ("start_time", 0.0, 86400.0, -1e-9, 86400.001),
    ("duration", 0.001, 86400.0, 0.0, 86400.001),
]
CHOICES = {
    "media_type": ("auto", "video", "image"),
    "model_type": ("seedvr2_3b", "seedvr2_7b"),
    "model_variant": ("normal", "sharp"),
    "attention_backend": ("auto", "flash", "sdpa"),
    "color_fix": ("wavelet", "adain", "none"),
    "deinterlace": ("auto", "on", "off"),
    "deinterlace_rate": ("frame", "field"),
}
MEGABYTE = "A" * 1_000_000


def restore(**fields) -> dict:
    return {"action": "restore", "media": "aGVsbG8=", **fields}


def rejection(job_input) -> str:
    with pytest.raises(RestoreError) as caught:
        parse_request(job_input)
    assert caught.value.code == INVALID_INPUT
    assert str(caught.value).startswith("INVALID_INPUT: ")
    return caught.value.message


# ---- Defaults and actions

def test_restore_defaults_equal_the_contract():
    request = parse_request({"action": "restore", "media": "aGVsbG8="})
    assert isinstance(request, RestoreRequest) and request.action == "restore"
    for name, expected in CONTRACT_RESTORE_DEFAULTS.items():
        assert getattr(request, name) == expected, name
        assert type(getattr(request, name)) is type(expected), name


def test_initialize_defaults_equal_the_contract():
    request = parse_request({"action": "initialize"})
    assert isinstance(request, InitializeRequest) and request.action == "initialize"
    assert dataclasses.asdict(request) == {**CONTRACT_INITIALIZE_DEFAULTS, **UPSCALER_OPTIONS}


def test_contract_examples_parse():
    request = parse_request({"action": "initialize", "model_type": "seedvr2_7b", "model_variant": "normal", "sp_size": 1})
    assert (request.model_type, request.model_variant, request.sp_size) == ("seedvr2_7b", "normal", 1)
    request = parse_request(restore(media_type="video", res_h=1280, res_w=720, seed=42, cfg_scale=1.0,
                                    cfg_rescale=0.0, sample_steps=1, model_type="seedvr2_7b", model_variant="sharp"))
    assert (request.seed, request.model_variant, request.media_type) == (42, "sharp", "video")


def test_health_takes_no_fields():
    assert isinstance(parse_request({"action": "health"}), HealthRequest)
    message = rejection({"action": "health", "res_h": 720, "verbose": True})
    assert "'res_h' (only for restore)" in message and "'verbose'" in message
    assert message.endswith("valid fields: action")


@pytest.mark.parametrize("job_input", [None, [], "restore", 5, [{"action": "health"}]],
                         ids=["null", "list", "string", "number", "list-of-object"])
def test_rejects_input_that_is_not_an_object(job_input):
    assert "input must be a JSON object" in rejection(job_input)


def test_missing_action_lists_the_actions():
    assert rejection({"media": "x"}) == "action is required: one of 'health', 'initialize', 'restore'"


@pytest.mark.parametrize("action", ["restor", "RESTORE", "", 1, None, ["restore"]])
def test_unknown_action_lists_the_actions(action):
    message = rejection({"action": action})
    assert message.startswith("action must be one of 'health', 'initialize', 'restore', got ")
    if action == "restor":
        assert message.endswith("(did you mean 'restore'?)")


# ---- Types and bounds of each field

def test_message_names_the_field_and_what_it_accepts():
    assert rejection(restore(res_h="abc")) == "res_h must be an integer between 16 and 8192, got 'abc'"
    assert rejection(restore(cfg_scale=True)) == "cfg_scale must be a number between 0.0 and 20.0, got true"
    assert rejection(restore(media_type="vidoe")) == \
        "media_type must be one of 'auto', 'video', 'image', got 'vidoe' (did you mean 'video'?)"


@pytest.mark.parametrize("name,low,high,below,above", NUMERIC_BOUNDS, ids=[row[0] for row in NUMERIC_BOUNDS])
def test_numeric_bounds_are_inclusive(name, low, high, below, above):
    partner = {"res_h": {"res_w": 16}, "res_w": {"res_h": 16}}.get(name, {})  # keep the area under the cap
    for accepted in (low, high):
        assert getattr(parse_request(restore(**{name: accepted}, **partner)), name) == accepted
    for rejected in (below, above):
        message = rejection(restore(**{name: rejected}, **partner))
        assert message.startswith(f"{name} must be ") and f"between {low} and {high}" in message


@pytest.mark.parametrize("name", [row[0] for row in NUMERIC_BOUNDS])
@pytest.mark.parametrize("value", [True, False, "720", "1.0", None, [720], {"value": 1}, math.nan, math.inf, -math.inf],
                         ids=["true", "false", "int-string", "float-string", "null", "list", "object", "nan", "inf",
                              "-inf"])
def test_numeric_fields_reject_non_numbers(name, value):
    if value is None and name in ("res_h", "res_w", "start_time", "duration"):  # nullable: null means "not given"
        defaults = {**CONTRACT_RESTORE_DEFAULTS, **MEDIA_OPTIONS}
        assert getattr(parse_request(restore(**{name: value})), name) == defaults[name]
        return
    assert rejection(restore(**{name: value})).startswith(f"{name} must be ")


@pytest.mark.parametrize("name,integral", [("res_h", 720.0), ("res_w", 1280.0), ("seed", 42.0), ("sample_steps", 2.0),
                                           ("sp_size", 2.0)])
def test_integer_fields_take_integral_floats_only(name, integral):
    value = getattr(parse_request(restore(**{name: integral})), name)
    assert type(value) is int and value == integral
    message = rejection(restore(**{name: integral + 0.5}))
    assert message.startswith(f"{name} must be an integer between") and message.endswith(f", got {integral + 0.5}")


@pytest.mark.parametrize("name", ["cfg_scale", "cfg_rescale"])
def test_float_fields_take_integers_as_floats(name):
    value = getattr(parse_request(restore(**{name: 1})), name)
    assert type(value) is float and value == 1.0


def test_huge_integers_are_rejected_without_overflow():
    assert rejection(restore(cfg_scale=10**400)) == "cfg_scale must be a number between 0.0 and 20.0, got a very " \
                                                    "large integer"
    assert rejection(restore(seed=10**30)).startswith("seed must be")
    assert rejection(restore(res_h=1e300)).startswith("res_h must be")


@pytest.mark.parametrize("name,options", CHOICES.items(), ids=list(CHOICES))
def test_choice_fields_take_exactly_their_options(name, options):
    context = {"model_type": "seedvr2_7b"} if name == "model_variant" else {}
    for option in options:
        assert getattr(parse_request(restore(**{name: option}, **context)), name) == option
    for wrong in (options[1].upper(), f" {options[1]}", 1, True, ["auto"], ""):
        message = rejection(restore(**{name: wrong}, **context))
        assert message.startswith(f"{name} must be one of " + ", ".join(repr(option) for option in options))


def test_null_means_not_given_only_where_the_default_is_null():
    assert parse_request(restore(model_type=None)).model_type is None
    assert parse_request({"action": "restore", "video": "eA==", "media": None}).media_field == "video"
    assert rejection(restore(color_fix=None)) == \
        "color_fix must be one of 'wavelet', 'adain', 'none', got null"


# ---- Unknown fields

@pytest.mark.parametrize("wrong,meant", [("res_height", "res_h"), ("colour_fix", "color_fix"), ("sample_step", "sample_steps"),
                                         ("seeds", "seed"), ("medai", "media")])
def test_unknown_field_suggests_the_close_one(wrong, meant):
    assert f"{wrong!r} (did you mean {meant!r}?)" in rejection(restore(**{wrong: 1}))


def test_unknown_field_without_a_close_match_lists_the_valid_fields():
    message = rejection({"action": "initialize", "zzz": 1})
    assert message == ("unknown field for action 'initialize': 'zzz'; valid fields: action, model_type, "
                       "model_variant, sp_size, attention_backend, compile, upscaler")


def test_restore_only_field_sent_to_initialize_says_where_it_belongs():
    assert "'media' (only for restore)" in rejection({"action": "initialize", "media": "eA=="})


# ---- Cross-field rules

def test_sharp_exists_only_for_7b():
    assert parse_request(restore(model_type="seedvr2_7b", model_variant="sharp")).model_variant == "sharp"
    assert rejection(restore(model_type="seedvr2_3b", model_variant="sharp")) == \
        "model_variant 'sharp' exists only for seedvr2_7b, not seedvr2_3b"
    message = rejection(restore(preset="fast", model_variant="sharp"))
    assert "only for seedvr2_7b, not seedvr2_3b" in message and "preset 'fast'" in message
    # without a model named, the model holder decides (sharp means the 7B): test_model_holder
    assert parse_request({"action": "initialize", "model_variant": "sharp"}).model_type is None


@pytest.mark.parametrize("model_type", ["seedvr2_3b", "seedvr2_7b"])
@pytest.mark.parametrize("action", ["initialize", "restore"])
def test_sp_size_must_divide_the_heads(action, model_type):
    """With a model named; without one, the model holder checks against the warm model (test_model_holder)."""
    allowed = SP_SIZES[model_type]
    base = restore() if action == "restore" else {"action": "initialize"}
    for sp_size in range(1, 25):
        job_input = {**base, "model_type": model_type, "sp_size": sp_size}
        if sp_size in allowed:
            assert parse_request(job_input).sp_size == sp_size
        else:
            message = rejection(job_input)
            assert message.startswith("sp_size must divide the") and message.endswith(f"got {sp_size}")
            assert ", ".join(map(str, sorted(allowed))) in message
    for out_of_range in (0, 25, -4):
        assert rejection({**base, "sp_size": out_of_range}).startswith("sp_size must be an integer between 1 and")


def test_no_media_is_an_error():
    assert rejection({"action": "restore"}) == \
        "No media provided: send base64 in `media` (or legacy `video`/`image`), or a URL in `media_url`"


@pytest.mark.parametrize("fields", [("media", "video"), ("media", "image"), ("video", "image"), ("media", "video", "image")])
def test_media_in_two_fields_is_an_error(fields):
    message = rejection({"action": "restore", **{name: "eA==" for name in fields}})
    assert all(f"`{name}`" in message for name in fields)


@pytest.mark.parametrize("value", ["", "   ", 5, True, ["eA=="], {"data": "eA=="}])
@pytest.mark.parametrize("name", ["media", "video", "image"])
def test_media_must_be_a_non_empty_string(name, value):
    if name == "media" and value == ["eA=="]:  # a list is how `media` carries several items
        assert parse_request({"action": "restore", name: value}).media_values == ("eA==",)
        return
    message = rejection({"action": "restore", name: value})
    accepts = "a non-empty string or a list of 1 to 16 of them" if name == "media" else "a non-empty string"
    assert message == f"{name} must be {accepts}, got {schema._show(value)}"  # and no "No media provided"


@pytest.mark.parametrize("field,media_type,expected", [
    ("media", "auto", "auto"), ("media", "image", "image"), ("video", "auto", "video"), ("video", "video", "video"),
    ("image", "auto", "image"), ("image", "image", "image"), ("video", None, "video"), ("image", None, "image"),
])
def test_media_field_and_implied_media_type(field, media_type, expected):
    job_input = {"action": "restore", field: "aGVsbG8="}
    if media_type is not None:
        job_input["media_type"] = media_type
    request = parse_request(job_input)
    assert (request.media_field, request.media_values, request.media_type) == (field, ("aGVsbG8=",), expected)


@pytest.mark.parametrize("field,media_type", [("video", "image"), ("image", "video")])
def test_legacy_field_contradicting_media_type_is_an_error(field, media_type):
    message = rejection({"action": "restore", field: "eA==", "media_type": media_type})
    assert message.startswith(f"media_type {media_type!r} contradicts the legacy `{field}` field")


def test_output_area_cap_defaults_to_4k(monkeypatch):
    monkeypatch.delenv("SEEDVR_MAX_OUTPUT_AREA", raising=False)
    assert parse_request(restore(res_h=3840, res_w=2160)).res_h == 3840
    assert rejection(restore(res_h=3841, res_w=2160)) == \
        f"res_h*res_w must be at most {3840 * 2160} pixels, got 3841*2160 = {3841 * 2160}"


def test_output_area_cap_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SEEDVR_MAX_OUTPUT_AREA", "10000")
    assert parse_request(restore(res_h=100, res_w=100)).res_w == 100
    assert "at most 10000 pixels" in rejection(restore(res_h=101, res_w=100))
    monkeypatch.setenv("SEEDVR_MAX_OUTPUT_AREA", "lots")  # the worker refuses to start (test_settings)
    with pytest.raises(settings.SettingsError, match="SEEDVR_MAX_OUTPUT_AREA must be an integer"):
        parse_request(restore())


# ---- Messages

def test_reports_every_problem_in_one_message():
    message = rejection(restore(res_h="abc", seed=-1, model_type="seedvr2_3b", model_variant="sharp"))
    problems = message.split("; ")
    assert len(problems) == 3
    assert [problem.split(" ")[0] for problem in problems] == ["res_h", "seed", "model_variant"]


def test_rules_skip_fields_that_are_already_wrong():
    # res_h is invalid: the area rule must not run on it, and the bad sp_size is reported once.
    message = rejection(restore(res_h=True, sp_size=7, model_type="seedvr2_3b"))
    assert message.count("res_h") == 1 and message.count("sp_size") == 1


@pytest.mark.parametrize("job_input", [
    restore(res_h=MEGABYTE), restore(media_type=MEGABYTE), restore(**{MEGABYTE: 1}), {"action": MEGABYTE},
    restore(color_fix="\x00\x1b[31m" + MEGABYTE), {"action": "restore", "media": MEGABYTE, "video": MEGABYTE},
    restore(**{f"unknown_{index}": MEGABYTE for index in range(1000)}),
], ids=["int-field", "choice-field", "key", "action", "control-chars", "two-media", "many-unknown-keys"])
def test_large_values_are_not_echoed(job_input):
    message = rejection(job_input)
    assert len(message) < 300 and "A" * 100 not in message and "\x1b" not in message


def test_a_request_wrong_everywhere_gives_a_bounded_message():
    wrong = {name: "?" * 10_000 for name in CONTRACT_RESTORE_DEFAULTS}
    message = rejection({"action": "restore", **wrong, **{f"x{index}": 0 for index in range(50)}})
    assert len(message) < 1000 and message.endswith("more problems")


def test_repr_keeps_the_media_out_of_logs():
    request = parse_request({"action": "restore", "video": MEGABYTE})
    assert "AAAA" not in repr(request) and len(repr(request)) < 1000  # every option, no media


def test_requests_are_frozen():
    request = parse_request(restore())
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.res_h = 16


# ---- The table

def test_every_field_has_a_doc_and_a_valid_default():
    for action, table in schema.TABLE.items():
        assert table[0].name == "action" and table[0].default is REQUIRED
        for field in table:
            assert field.doc.strip(), f"{action}.{field.name} has no doc"
            if field.default not in (REQUIRED, None):
                read = field.accepts.read(field.default)
                assert read == field.default or isinstance(field.accepts, schema.Resolution), f"{action}.{field.name}"


def test_media_options_default_to_auto_deinterlacing_and_the_whole_video():
    request = parse_request(restore())
    assert {name: getattr(request, name) for name in MEDIA_OPTIONS} == MEDIA_OPTIONS


def test_table_lists_exactly_the_contract_fields():
    names = {action: {field.name for field in table} for action, table in schema.TABLE.items()}
    assert names["health"] == {"action"}
    assert names["initialize"] == {"action", *CONTRACT_INITIALIZE_DEFAULTS, *UPSCALER_OPTIONS}
    assert names["restore"] == {"action", "media", "video", "image", *CONTRACT_RESTORE_DEFAULTS, *DELIVERY_OPTIONS,
                                *MEMORY_OPTIONS, *MEDIA_OPTIONS, *STRENGTH_OPTIONS,
                                *FANOUT_OPTIONS, *INTERPOLATION_OPTIONS, *UPSCALER_OPTIONS, *FALLBACK_OPTIONS}


def test_describe_lists_every_field_with_its_default():
    text = schema.describe()
    for action, table in schema.TABLE.items():
        assert f"### `{action}`" in text
        for field in table:
            assert f"| `{field.name}` |" in text
    assert "| `seed` | an integer between 0 and 4294967295 | `666` |" in text
    assert "| `res_h` | an integer between 16 and 8192 | `null` |" in text  # null = 1280 or the preset's
    assert "| `action` | one of 'health', 'initialize', 'restore' | required |" in text


def test_a_new_table_row_is_parsed_without_touching_the_parser(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class WithWarmup(RestoreRequest):
        warmup_frames: int = schema.option(0, schema.Integer(0, 1000), "frames run before the clip; 0 = none")

    monkeypatch.setitem(schema.REQUEST_TYPES, "restore", WithWarmup)
    monkeypatch.setitem(schema.TABLE, "restore", schema._table_of(WithWarmup))
    assert parse_request(restore(warmup_frames=33)).warmup_frames == 33
    assert parse_request(restore()).warmup_frames == 0
    assert rejection(restore(warmup_frames=-1)) == "warmup_frames must be an integer between 0 and 1000, got -1"


@pytest.mark.parametrize("model_type", ["seedvr2_3b", "seedvr2_7b"])
def test_head_counts_match_the_model_configs(model_type):
    omegaconf = pytest.importorskip("omegaconf")
    path = REPO_ROOT / f"configs_{model_type.removeprefix('seedvr2_')}" / "main.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert omegaconf.OmegaConf.load(path).dit.kwargs.heads == registry.card(model_type).heads


# ---- Issue 5 options

def test_preset_sets_model_and_area_unless_given():
    quality = parse_request(restore(preset="quality"))
    assert (quality.model_type, quality.res_h, quality.res_w) == ("seedvr2_7b", 1920, 1080)
    fast = parse_request(restore(preset="fast", model_type="seedvr2_7b", res_h=640))
    assert (fast.model_type, fast.res_h, fast.res_w) == ("seedvr2_7b", 640, 854)
    # the preset's model is the one the cross-field checks assume
    assert parse_request(restore(preset="quality", model_variant="sharp")).model_variant == "sharp"
    assert "preset 'fast'" in rejection(restore(preset="fast", model_variant="sharp"))


def test_scale_excludes_res_and_leaves_them_unresolved():
    request = parse_request(restore(scale=2))
    assert request.scale == 2.0 and request.res_h is None and request.res_w is None
    assert rejection(restore(scale=2, res_w=720)) == "send either scale or res_h/res_w, not both"
    assert rejection(restore(scale=9)).startswith("scale must be a number between 0.25 and 8.0")


@pytest.mark.parametrize("value,expected", [("1920x1080", (1920, 1080)), ("640X360", (640, 360))])
def test_max_resolution_reads_width_by_height(value, expected):
    assert parse_request(restore(max_resolution=value)).max_resolution == expected


@pytest.mark.parametrize("value", ["1920*1080", "x1080", "15x1080", "1920x", 1920, ["1920", "1080"], "9000x10"])
def test_max_resolution_rejects_other_shapes(value):
    assert rejection(restore(max_resolution=value)).startswith("max_resolution must be \"WIDTHxHEIGHT\"")


def test_media_lists_and_urls():
    request = parse_request({"action": "restore", "media_url": ["https://a/x.mp4", "https://b/y.png"]})
    assert request.media_field == "media_url" and request.media_values == ("https://a/x.mp4", "https://b/y.png")
    assert "1 to 16" in rejection({"action": "restore", "media": ["eA=="] * 17})
    assert "1 to 16" in rejection({"action": "restore", "media": []})
    assert "`media` and `media_url`" in rejection({"action": "restore", "media": "eA==", "media_url": "https://a"})
    assert "https://a" not in repr(request)


def test_codec_crf_and_container_are_checked_together():
    assert rejection(restore(codec="h264", crf=52)) == "crf for h264 must be between 0 and 51, got 52"
    assert parse_request(restore(codec="vp9", crf=63)).crf == 63
    assert rejection(restore(codec="h265", container="webm")).startswith("container: a webm file cannot hold h265")
    assert parse_request(restore(codec="av1", container="webm")).container == "webm"


@pytest.mark.parametrize("name", ["return_data_uri", "compare"])
def test_boolean_options_take_only_booleans(name):
    assert getattr(parse_request(restore(**{name: True})), name) is True
    assert rejection(restore(**{name: 1})) == f"{name} must be true or false, got 1"

