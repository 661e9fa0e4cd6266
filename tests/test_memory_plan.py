"""The memory plan (estimates, choice, retries, the largest size that fits), and the model settings it
drives: VAE slicing, conv splitting, spatial tiles, DiT block offload."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from seedvr import settings
from seedvr.engine import memory_plan
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.engine.memory_plan import Estimate, Footprint, MemoryPlan, Wishes, candidates, choose, estimate
from seedvr.engine.pipeline import SeedVR2
from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.models.block_offload import BlockOffload
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.vae import VideoAutoencoder
from seedvr.models.vae_tiling import SpatialTiling, tile_starts
from seedvr.serving.schema import parse_request
from seedvr.serving.specs import restore_spec

GIB = 1024**3
FULL_3B, FULL_7B = Footprint.full_size("seedvr2_3b"), Footprint.full_size("seedvr2_7b")
P720 = (720, 1280)
WHOLE = MemoryPlan(None, 0, None, memory_plan.CONV_MAX_BYTES, None, False)


def plan(**changes) -> MemoryPlan:
    fields = dict(chunk_frames=None, chunk_overlap=0, vae_temporal_chunk=4, vae_conv_max_bytes=GIB // 2,
                  vae_tile=None, dit_offload=False)
    return MemoryPlan(**(fields | changes))


# ---- Estimates

def test_full_size_footprints_match_the_official_manifests(reference):
    for model_type, name in (("seedvr2_3b", "dit_3b"), ("seedvr2_7b", "dit_7b")):
        blocks, other = {}, 0
        with open(reference / "manifests" / f"{name}.tsv") as file:
            for row in csv.DictReader(file, delimiter="\t"):
                size = int(row["numel"]) * (2 if "x" in row["shape"] else 4)  # bf16 matrices, float32 vectors
                if row["key"].startswith("blocks."):
                    index = int(row["key"].split(".")[1])
                    blocks[index] = blocks.get(index, 0) + size
                else:
                    other += size
        footprint = Footprint.full_size(model_type)
        assert (footprint.dit_blocks_bytes, footprint.dit_block_bytes, footprint.dit_other_bytes) == (
            sum(blocks.values()), max(blocks.values()), other)
    with open(reference / "manifests" / "vae.tsv") as file:
        assert FULL_3B.vae_bytes == 2 * sum(int(row["numel"]) for row in csv.DictReader(file, delimiter="\t"))


def test_estimate_follows_the_documented_formulas():
    guess = estimate(plan(), FULL_3B, 21, (480, 854), P720)
    pixels = 720 * 1280
    video = 12 * 21 * pixels
    tokens = 6 * 45 * 80  # 21 frames -> 6 latent frames; 720x1280 -> 45x80 patches
    assert guess.weights == FULL_3B.weights_bytes
    assert guess.phases["dit"] == video + int(27.0 * 2560 * 2 * tokens)
    assert guess.phases["vae_decode"] == video + 6 * 21 * pixels + int(128 * 2 * pixels * (18.0 * 5 + 40.0))
    assert guess.phases["vae_encode"] == video + 18 * 21 * pixels + int(128 * 2 * pixels * (11.5 * 5 + 20.0))
    assert guess.phases["preprocess"] == 21 * (15 * 480 * 854 + 36 * pixels)
    assert guess.peak == guess.weights + max(guess.phases.values())


def test_estimate_grows_with_the_clip_and_shrinks_with_each_measure():
    base = estimate(plan(), FULL_7B, 61, P720, P720)
    assert estimate(plan(), FULL_7B, 121, P720, P720).peak > base.peak
    assert estimate(plan(), FULL_7B, 61, P720, (1072, 1920)).peak > base.peak
    chunked = estimate(plan(chunk_frames=21, chunk_overlap=5), FULL_7B, 61, P720, P720)
    assert chunked.phases["dit"] < base.phases["dit"]
    tiled = estimate(plan(vae_tile=256), FULL_7B, 61, P720, P720)
    assert tiled.phases["vae_decode"] < base.phases["vae_decode"] and tiled.phases["dit"] == base.phases["dit"]
    offloaded = estimate(plan(dit_offload=True), FULL_7B, 61, P720, P720)
    assert base.weights - offloaded.weights == FULL_7B.dit_blocks_bytes - 2 * FULL_7B.dit_block_bytes
    unsliced = estimate(plan(vae_temporal_chunk=None), FULL_7B, 61, P720, P720)
    assert unsliced.phases["vae_decode"] > base.phases["vae_decode"]


# ---- Choosing

def test_plenty_of_memory_gives_the_official_whole_clip_pass():
    chosen, _ = choose(FULL_7B, 10**15, 90, P720, P720)
    assert chosen == WHOLE


def test_long_clips_are_chunked_at_the_cap_even_with_plenty_of_memory(monkeypatch):
    chosen, _ = choose(FULL_7B, 10**15, 122, P720, P720)
    assert (chosen.chunk_frames, chosen.chunk_overlap) == (121, 9)
    monkeypatch.setenv("SEEDVR_MAX_CHUNK_FRAMES", "45")
    chosen, _ = choose(FULL_7B, 10**15, 100, P720, P720)
    assert (chosen.chunk_frames, chosen.chunk_overlap) == (45, 9)
    monkeypatch.setenv("SEEDVR_MAX_CHUNK_FRAMES", "44")
    with pytest.raises(settings.SettingsError, match="SEEDVR_MAX_CHUNK_FRAMES must be 4n\\+1"):
        choose(FULL_7B, 10**15, 100, P720, P720)


@pytest.mark.parametrize("budget_gib", [80, 48, 40, 30, 24, 16, 12])
def test_the_choice_is_the_first_candidate_that_fits(budget_gib):
    budget = budget_gib * GIB
    chosen, guess = choose(FULL_7B, budget, 300, P720, P720)
    ordered = list(candidates(300, P720, Wishes()))
    fitting = [c for c in ordered if estimate(c, FULL_7B, 300, P720, P720).peak <= budget]
    if fitting:
        assert chosen == fitting[0] and guess.peak <= budget
    else:  # none fits: the one needing least is tried anyway
        assert guess.peak == min(estimate(c, FULL_7B, 300, P720, P720).peak for c in ordered)


def test_candidates_try_offload_before_tiles_and_long_chunks_before_short_ones():
    ordered = list(candidates(300, P720, Wishes()))
    first_offload = next(i for i, c in enumerate(ordered) if c.dit_offload)
    first_tile = next(i for i, c in enumerate(ordered) if c.vae_tile is not None)
    first_short = next(i for i, c in enumerate(ordered) if c.chunk_frames < memory_plan.PREFERRED_MIN_CHUNK)
    assert first_offload < first_tile < first_short
    assert all(c.chunk_frames >= memory_plan.PREFERRED_MIN_CHUNK for c in ordered[:first_short])
    for c in ordered:
        assert c.chunk_frames % 4 == 1 and 0 <= c.chunk_overlap < c.chunk_frames and c.chunk_overlap % 4 == 1


def test_wishes_pin_their_part_of_every_candidate():
    wishes = Wishes(chunk_frames=33, chunk_overlap=4, vae_tiling=True, dit_offload=False)
    for c in candidates(300, P720, wishes):
        assert (c.chunk_frames, c.chunk_overlap, c.dit_offload) == (33, 4, False) and c.vae_tile in (512, 256)
    assert {c.vae_tile for c in candidates(300, P720, Wishes(vae_tile_size=320))} == {320}
    assert {c.vae_tile for c in candidates(300, P720, Wishes(vae_tiling=False))} == {None}
    assert {c.chunk_frames for c in candidates(30, P720, Wishes(chunk_frames=41))} == {None}  # longer than the clip
    assert all(c.chunk_frames > 12 for c in candidates(300, P720, Wishes(chunk_overlap=12)))


def test_a_retry_needs_at_most_the_shrunk_estimate_and_ends_when_nothing_does():
    budget = 24 * GIB
    chosen, guess = choose(FULL_7B, budget, 300, P720, P720)
    seen = [guess.peak]
    while (retry := memory_plan.smaller(guess, FULL_7B, budget, 300, P720, P720)) is not None:
        chosen, guess = retry
        assert guess.peak <= memory_plan.RETRY_SHRINK * seen[-1]
        seen.append(guess.peak)
    assert len(seen) >= 2
    floor = min(estimate(c, FULL_7B, 300, P720, P720).peak for c in candidates(300, P720, Wishes()))
    assert seen[-1] * memory_plan.RETRY_SHRINK < floor  # no candidate fits what would be asked next


def test_the_largest_fitting_size_fits_and_a_step_larger_does_not():
    target = 6 * GIB
    height, width = memory_plan.largest_fitting_size(FULL_7B, target, 100, (1080, 1920), (2160, 3840))
    assert height < 2160 and width < 3840  # the size that failed is never suggested
    assert height % 16 == 0 and width % 16 == 0 and abs(width / height - 16 / 9) < 0.05

    def fits(size):
        return any(estimate(c, FULL_7B, 100, (1080, 1920), size).peak <= target
                   for c in candidates(100, size, Wishes()))

    assert fits((height, width))
    assert not fits((height + 16, width + 32))
    assert memory_plan.largest_fitting_size(FULL_7B, 1 * GIB, 100, (1080, 1920), (2160, 3840)) is None


def test_out_of_memory_message_names_the_size_that_fits():
    failed = estimate(plan(chunk_frames=5, chunk_overlap=1, vae_tile=256, dit_offload=True), FULL_7B, 100,
                      (1080, 1920), (2160, 3840))
    message = memory_plan.out_of_memory_message(FULL_7B, 20 * GIB, failed, 100, (1080, 1920), (2160, 3840))
    assert "3840x2160 output of 100 frames" in message and "at most " in message and "for 100 frames" in message
    pinned = memory_plan.out_of_memory_message(FULL_7B, 20 * GIB, failed, 100, (1080, 1920), (2160, 3840),
                                               Wishes(dit_offload=False))
    assert "dit_offload" in pinned
    hopeless = memory_plan.out_of_memory_message(FULL_7B, 1 * GIB, failed, 100, (1080, 1920), (2160, 3840))
    assert "alone needs about" in hopeless


def test_simulated_device_raises_a_genuine_out_of_memory_error(monkeypatch):
    guess = Estimate(weights=100, phases={"dit": 50, "vae_decode": 80})
    memory_plan.check_simulated(guess, "dit")  # no budget injected: nothing happens
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES", "160")
    memory_plan.check_simulated(guess, "dit")
    memory_plan.check_simulated(guess, "postprocess")
    with pytest.raises(torch.OutOfMemoryError):
        memory_plan.check_simulated(guess, "vae_decode")
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_SCALE", "1.1")
    with pytest.raises(torch.OutOfMemoryError):
        memory_plan.check_simulated(guess, "dit")


# ---- The request's options

@pytest.mark.parametrize("fields, needle", [
    ({"chunk_frames": 20}, "use 17 or 21"),
    ({"chunk_frames": 6}, "use 5 or 9"),
    ({"chunk_frames": 4}, "chunk_frames must be an integer between 5"),
    ({"chunk_frames": 21, "chunk_overlap": 21}, "chunk_overlap must be less than chunk_frames (21)"),
    ({"vae_tiling": False, "vae_tile_size": 256}, "vae_tiling is false"),
    ({"vae_tile_size": 100}, "multiple of 16"),
    ({"dit_offload": "yes"}, "dit_offload must be true or false"),
])
def test_memory_options_are_checked(fields, needle):
    with pytest.raises(RestoreError) as caught:
        parse_request({"action": "restore", "media": "aGVsbG8=", **fields})
    assert caught.value.code == INVALID_INPUT and needle in caught.value.message


def test_memory_options_reach_the_wishes():
    request = parse_request({"action": "restore", "media": "aGVsbG8=", "chunk_frames": 33, "chunk_overlap": 5,
                             "vae_tile_size": 256, "dit_offload": True})
    assert restore_spec(request).memory == Wishes(33, 5, None, 256, True)
    assert restore_spec(parse_request({"action": "restore", "media": "aGVsbG8="})).memory == Wishes()


# ---- What the plan drives: VAE tiles and DiT offload

@pytest.fixture(scope="module")
def tiny_vae(golden):
    meta = json.loads((golden / "vae_tiny" / "meta.json").read_text())
    weights = golden / "vae_tiny" / "weights.safetensors"
    return load_strict(VideoAutoencoder(**meta["config"]["kwargs"]).eval(), read_state_dict(weights), weights)


@pytest.mark.parametrize("length, tile, overlap", [(10, 16, 4), (64, 16, 4), (70, 16, 4), (25, 8, 0), (9, 8, 7)])
def test_tiles_cover_the_axis_flush_with_both_ends(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tiling_is_exact_for_operators_that_see_one_cell():
    torch.manual_seed(0)
    tiling = SpatialTiling(64, 16)
    video = torch.randn(1, 3, 5, 200, 296)
    mix = torch.randn(4, 3)

    def encode(x):  # 8x8 average of a per-pixel channel mix: each output cell sees its own 8x8 pixels only
        return F.avg_pool3d(torch.einsum("oc,bcthw->bothw", mix, x), (1, 8, 8))

    def decode(z):
        return F.interpolate(torch.einsum("oc,bcthw->bothw", mix.T, z), scale_factor=(1, 8, 8), mode="nearest")

    torch.testing.assert_close(tiling.encode(encode, video, 8), encode(video), atol=1e-5, rtol=1e-5)
    latent = torch.randn(1, 4, 2, 25, 37)
    torch.testing.assert_close(tiling.decode(decode, latent, 8), decode(latent), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vae_tiles_run_and_stay_close_on_smooth_homogeneous_frames(tiny_vae):
    """Tiling is approximate: each tile normalises with its own statistics. On smooth content whose
    statistics are the same in every tile (a periodic pattern, 32 px period) the tiled VAE stays close to
    the untiled one; a frame inside one tile is exact."""
    height, width = 128, 192
    y, x = torch.meshgrid(torch.arange(height) / 32, torch.arange(width) / 32, indexing="ij")
    video = torch.stack([torch.stack([0.5 * torch.sin(2 * math.pi * x + t) * torch.sin(2 * math.pi * y),
                                      0.3 * torch.cos(2 * math.pi * x), torch.full_like(x, 0.2)])
                         for t in range(5)], dim=1)[None]
    with torch.inference_mode():
        mean, _ = tiny_vae.encode(video)
        decoded = tiny_vae.decode(mean)
        try:
            tiny_vae.tiling = SpatialTiling(128, 32)
            tiled_mean, _ = tiny_vae.encode(video)
            tiled_decoded = tiny_vae.decode(mean)
            tiny_vae.tiling = SpatialTiling(256, 32)  # larger than the frame: one tile, exact
            assert torch.equal(tiny_vae.decode(mean), decoded)
        finally:
            tiny_vae.tiling = None

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert tiled_decoded.shape == decoded.shape and tiled_mean.shape == mean.shape
    assert relative(tiled_mean, mean) < 0.15
    assert relative(tiled_decoded, decoded) < 0.35


@pytest.fixture(scope="module")
def tiny_dit(golden):
    meta = json.loads((golden / "dit3b_tiny" / "meta.json").read_text())
    weights = golden / "dit3b_tiny" / "weights.safetensors"
    return load_strict(NaDiT3B(**meta["config"]["kwargs"]).eval(), read_state_dict(weights), weights)


def test_block_offload_visits_every_block_in_order_and_changes_nothing(tiny_dit):
    torch.manual_seed(0)
    txt_dim = tiny_dit.txt_in.in_features
    inputs = dict(vid=torch.randn(2 * 4 * 6, 33), txt=torch.randn(5, txt_dim), vid_shape=torch.tensor([[2, 4, 6]]),
                  txt_shape=torch.tensor([[5]]), timestep=torch.tensor([1000.0]))
    with torch.inference_mode():
        expected = tiny_dit(**inputs)
    offload = BlockOffload(tiny_dit.blocks, torch.device("cpu"))
    loaded = []
    original_load = offload.load
    offload.load = lambda index: (loaded.append(index), original_load(index))[1]
    tiny_dit.block_offload = offload
    try:
        with torch.inference_mode():
            result = tiny_dit(**inputs)
    finally:
        tiny_dit.block_offload = None
        offload.close()
    assert loaded == list(range(len(tiny_dit.blocks)))
    assert torch.equal(result, expected)


def test_a_plan_sets_the_models_up_and_back(tiny_vae, tiny_dit, golden):
    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    pipeline = SeedVR2(tiny_dit, tiny_vae, text["pos"], text["neg"], device="cpu")
    try:
        pipeline.apply_plan(plan(vae_temporal_chunk=None, vae_conv_max_bytes=12345, vae_tile=256, dit_offload=True))
        assert tiny_vae.temporal_chunk is None and tiny_vae.conv_max_bytes == 12345
        assert tiny_vae.tiling == SpatialTiling(256, memory_plan.tile_overlap(256))
        assert isinstance(tiny_dit.block_offload, BlockOffload)
        pipeline.apply_plan(plan())
        assert tiny_vae.temporal_chunk == 4 and tiny_vae.tiling is None and tiny_dit.block_offload is None
    finally:
        pipeline.apply_plan(plan())
        tiny_vae.conv_max_bytes = GIB // 2


def test_footprint_of_a_loaded_pipeline_counts_its_tensors(tiny_vae, tiny_dit, golden):
    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    footprint = SeedVR2(tiny_dit, tiny_vae, text["pos"], text["neg"], device="cpu").footprint()
    dit_bytes = sum(p.numel() * 4 for p in tiny_dit.parameters()) + sum(b.numel() * b.element_size()
                                                                         for b in tiny_dit.buffers())
    assert footprint.dit_blocks_bytes + footprint.dit_other_bytes == dit_bytes
    assert footprint.dit_block_bytes == max(sum(p.numel() * 4 for p in block.parameters())
                                            + sum(b.numel() * b.element_size() for b in block.buffers())
                                            for block in tiny_dit.blocks)
    assert footprint.vae_bytes == sum(p.numel() * 4 for p in tiny_vae.parameters())
    assert (footprint.dit_elements_per_token, footprint.activation_bytes, footprint.vae_width) == (
        FULL_3B.dit_elements_per_token, 4, 8)  # the 3B's architecture constant, float32 activations
    assert footprint.dit_width == json.loads((golden / "dit3b_tiny" / "meta.json").read_text())[
        "config"]["kwargs"]["vid_dim"]
