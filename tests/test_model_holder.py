"""The warm model is sticky: a field left out means "what is warm"; an explicit value switches. With
nothing warm the defaults apply (seedvr2_3b, or the model that has the asked-for variant)."""

import base64
import weakref

import pytest
from media_factory import make_image
from worker_server import tiny_paths

from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.serving.model_holder import ModelHolder, ModelSpec
from seedvr.serving.specs import ModelChoice


@pytest.fixture
def holder(tiny_dir, monkeypatch):
    for name, value in tiny_paths(tiny_dir).items():
        monkeypatch.setenv(name, value)
    held = ModelHolder()
    yield held
    held.release()


def spec(model_type="seedvr2_3b", variant="normal", sp_size=1, attention="auto") -> ModelSpec:
    return ModelSpec(model_type, variant, sp_size, attention)


@pytest.mark.parametrize("choice, expected", [
    (ModelChoice(), spec()),
    (ModelChoice(variant="sharp"), spec("seedvr2_7b", "sharp")),  # only the 7B has it
    (ModelChoice(model_type="seedvr2_7b"), spec("seedvr2_7b")),
    (ModelChoice(sp_size=4, attention_backend="sdpa"), spec(sp_size=4, attention="sdpa")),
], ids=["defaults", "sharp-means-7b", "7b", "sp-and-backend"])
def test_with_nothing_warm_the_defaults_apply(holder, choice, expected):
    assert holder.resolve(choice) == expected


def test_a_warm_sharp_model_stays_for_requests_that_name_no_model(holder):
    warm = holder.ensure(holder.resolve(ModelChoice("seedvr2_7b", "sharp")))
    restorer = weakref.ref(warm.restorer)
    assert holder.resolve(ModelChoice()) == spec("seedvr2_7b", "sharp")
    assert holder.resolve(ModelChoice(model_type="seedvr2_7b")) == spec("seedvr2_7b", "sharp")
    assert holder.resolve(ModelChoice(variant="sharp")) == spec("seedvr2_7b", "sharp")
    assert holder.ensure(holder.resolve(ModelChoice())).restorer is restorer()  # no reload
    # explicit values switch
    assert holder.resolve(ModelChoice(variant="normal")) == spec("seedvr2_7b", "normal")
    assert holder.resolve(ModelChoice(model_type="seedvr2_3b")) == spec("seedvr2_3b", "normal")


def test_a_warm_3b_asked_for_sharp_moves_to_the_7b(holder):
    holder.ensure(holder.resolve(ModelChoice()))
    assert holder.resolve(ModelChoice(variant="sharp")) == spec("seedvr2_7b", "sharp")


def test_the_warm_sp_size_and_backend_carry_over_where_they_fit(holder):
    holder.ensure(holder.resolve(ModelChoice(attention_backend="sdpa")))
    assert holder.resolve(ModelChoice(model_type="seedvr2_7b")) == spec("seedvr2_7b", attention="sdpa")


def test_a_choice_the_model_cannot_take_names_where_the_model_came_from(holder):
    holder.ensure(holder.resolve(ModelChoice(model_type="seedvr2_7b")))
    with pytest.raises(RestoreError) as caught:
        holder.resolve(ModelChoice(sp_size=5))  # the warm 7B has 24 heads
    assert caught.value.code == INVALID_INPUT
    assert caught.value.message == ("sp_size must divide the 24 attention heads of seedvr2_7b (the warm model, as "
                                    "model_type is not given): one of 1, 2, 3, 4, 6, 8, 12, 24, got 5")
    with pytest.raises(RestoreError, match="model_variant 'sharp' exists only for seedvr2_7b, not seedvr2_3b"):
        holder.resolve(ModelChoice(model_type="seedvr2_3b", variant="sharp"))
    with pytest.raises(RestoreError, match="attention_backend: attention backend 'flash' is not available here"):
        holder.resolve(ModelChoice(attention_backend="flash"))


def test_through_the_handler_initialize_sharp_then_restore_keeps_sharp(tiny_handler, tmp_path):
    import handler

    answer = tiny_handler({"id": "init", "input": {"action": "initialize", "model_type": "seedvr2_7b",
                                                    "model_variant": "sharp"}})
    assert (answer["model_type"], answer["model_variant"]) == ("seedvr2_7b", "sharp")
    dit = weakref.ref(handler.HOLDER.current.restorer.dit)
    path, _, _ = make_image(tmp_path, "jpeg")
    media = base64.b64encode(path.read_bytes()).decode()
    restored = tiny_handler({"id": "r", "input": {"action": "restore", "media": media, "res_h": 64, "res_w": 96}})
    assert (restored["model_type"], restored["model_variant"]) == ("seedvr2_7b", "sharp")
    again = tiny_handler({"id": "i2", "input": {"action": "initialize"}})
    assert (again["model_type"], again["model_variant"]) == ("seedvr2_7b", "sharp")
    assert handler.HOLDER.current.restorer.dit is dit()  # the same weights all along
    assert tiny_handler({"id": "h", "input": {"action": "health"}})["model_variant"] == "sharp"


@pytest.mark.slow
def test_compile_is_warmed_up_at_load_and_gives_the_eager_frames(holder, tmp_path):
    """torch.compile of the DiT blocks on the CPU (inductor): compiled when the model loads, with a warm-up, and
    the same uint8 frames as eager (off by at most 1)."""
    from fractions import Fraction

    from media_factory import pattern_frames, write_video

    from seedvr.io.media.video import probe_video, read_frames
    from seedvr.serving import jobs
    from seedvr.serving.schema import parse_request

    clip = tmp_path / "clip.mp4"
    write_video(clip, pattern_frames(9, 64, 48), Fraction(25))
    media = base64.b64encode(clip.read_bytes()).decode()
    frames = {}
    for compiled in (False, True):
        request = parse_request({"action": "restore", "media": media, "res_h": 48, "res_w": 64, "crf": 0,
                                 "compile": compiled})
        answer = jobs.restore(request, jobs.JobContext(f"compile-{compiled}"), holder)
        assert answer["processing_info"]["compile"] is compiled
        out = tmp_path / f"out-{compiled}.mp4"
        out.write_bytes(base64.b64decode(answer["media"][0]))
        frames[compiled] = read_frames(out, probe_video(out)).astype(int)
        if compiled:
            assert holder.current.restorer.compiled and answer["processing_info"]["timings"]["dit"] < 30
    assert frames[True].std() > 5 and abs(frames[True] - frames[False]).max() <= 1
    assert holder.resolve(ModelChoice()).compile  # sticky like the other model fields
    holder.ensure(holder.resolve(ModelChoice(compile=False)))
    assert not holder.current.restorer.compiled
