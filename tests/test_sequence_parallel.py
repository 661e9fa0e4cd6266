"""Sequence parallelism on CPU: two gloo ranks must reproduce the single-process results.

The groups run the tiny random-weight installation (python -m seedvr.tiny). The `_on_rank_*` functions
run inside the rank processes (through SequenceParallelGroup.call) and must stay module-level.
"""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from seedvr.distributed.tokens import TokenShard
from seedvr.distributed.vae_context import plan_pieces
from seedvr.engine import loader
from seedvr.engine.restorer import Sampling
from seedvr.errors import RestoreError
from seedvr.spgroup.group import SequenceParallelError, SequenceParallelGroup
from seedvr.tools import tiny

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane

DIT_ATOL = 1e-4
SP = 2


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.write(root)
    with pytest.MonkeyPatch.context() as patch:  # read by this process and inherited by the ranks
        patch.setenv("SEEDVR_CONFIG_DIR", str(root))
        patch.setenv("SEEDVR_CKPT_DIR", str(root / "ckpts"))
        patch.setenv("SEEDVR_EMBEDDINGS_DIR", str(root / "embeddings"))
        yield root


@pytest.fixture(scope="module")
def groups(installation):
    started = {}

    def get(model_type):
        if model_type not in started:
            started[model_type] = SequenceParallelGroup(model_type, "normal", SP, device_kind="cpu")
        return started[model_type]

    yield get
    for group in started.values():
        group.close()


@pytest.fixture(scope="module")
def references(installation):
    loaded = {}

    def get(model_type):
        if model_type not in loaded:
            loaded[model_type] = loader.load_pipeline(model_type, device=torch.device("cpu"))
        return loaded[model_type]

    return get


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def clip(frames: int) -> np.ndarray:
    """48x80 frames: 6x10 latents, 3x5 = 15 DiT tokens per latent frame (odd: the split needs padding)."""
    return np.random.default_rng(frames).integers(0, 256, (frames, 48, 80, 3), dtype=np.uint8)


# -- whole restorations ------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["seedvr2_3b", "seedvr2_7b"])
@pytest.mark.parametrize("frames", [11, 1], ids=["video", "image"])
def test_restore_equals_single_process(groups, references, model_type, frames):
    """11 frames -> 13 padded -> the VAE splits 5 + 4 + 4 frames over two rounds (the second with a
    stand-in), the DiT 4 x 15 = 60 tokens; an image runs the VAE on rank 0 and still splits 15 tokens.
    The 7B runs with condition noise (cond_noise_scale 0.5): the aug noise reaches the ranks as drawn."""
    strength = 0.5 if model_type == "seedvr2_7b" else 0.0
    options = dict(res_h=48, res_w=80, sampling=Sampling(seed=7, cond_noise_scale=strength))
    timings, stages, phases = {}, {}, []
    out = groups(model_type).restore(clip(frames), timings=timings, stages=stages, on_phase=phases.append,
                                     **options)
    expected_stages = {}
    expected = references(model_type).restore(clip(frames), stages=expected_stages, **options)

    dit_error = (stages["dit0_out"] - expected_stages["dit0_out"]).abs().max().item()
    assert dit_error <= DIT_ATOL, f"DiT output max abs error {dit_error:.2e}"
    assert out.shape == expected.shape and out.dtype == torch.uint8
    off = (out.int() - expected.int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() <= 1e-3
    assert phases == ["preprocess", "vae_encode", "dit", "vae_decode", "postprocess"]
    assert set(timings) == set(phases) and all(seconds >= 0 for seconds in timings.values())


def test_an_error_every_rank_raises_keeps_the_group(groups):
    group = groups("seedvr2_3b")
    pids = group.pids
    assert group.model_info == {"device": "cpu", "dtype": "float32", "random_weights": True, "devices": ["cpu"] * SP}
    with pytest.raises(ValueError, match="unknown color_fix"):
        group.restore(clip(1), res_h=48, res_w=80, sampling=Sampling(color_fix="sepia"))
    assert group.alive() and group.pids == pids


# -- the DiT alone -----------------------------------------------------------------------------------

DIT_SHAPES = [(2, 4, 6), (1, 6, 10)]  # latent grids of two samples: 12 + 15 = 27 tokens
TXT_LENGTHS = [5, 8]  # 13 text tokens


def dit_inputs(txt_dim: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = sum(math.prod(shape) for shape in DIT_SHAPES)
    return dict(vid=torch.randn(tokens, 33, generator=generator),
                txt=torch.randn(sum(TXT_LENGTHS), txt_dim, generator=generator),
                vid_shape=torch.tensor(DIT_SHAPES), txt_shape=torch.tensor([[n] for n in TXT_LENGTHS]),
                timestep=torch.tensor([1000.0, 500.0]))


def _on_rank_dit(context, txt_dim):
    """The DiT under SP, and the rows its first block's MLP saw on this rank."""
    dit = context.pipeline.dit
    rows = []
    hook = dit.blocks[0].mlp.for_vid.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    with torch.inference_mode():
        out = dit(**dit_inputs(txt_dim), sp=context.sp)
    hook.remove()
    return out, rows


@pytest.mark.parametrize("model_type", ["seedvr2_3b", "seedvr2_7b"])
def test_dit_splits_tokens_and_matches(groups, references, model_type):
    reference = references(model_type).dit
    txt_dim = reference.txt_in.in_features
    results = groups(model_type).call(_on_rank_dit, txt_dim)
    with torch.inference_mode():
        expected = reference(**dit_inputs(txt_dim))
    for out, rows in results:
        assert rows == [math.ceil(27 / SP)]  # 27 video tokens: 14 rows per rank, one of them padding
        error = (out - expected).abs().max().item()
        assert error <= 1e-5, f"max abs error {error:.2e}"


class _Rank:
    """Stands for one rank of a group in single-process checks."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_token_shard_rows_and_sample_lengths():
    lengths = [12, 15]
    shards = [TokenShard(_Rank(rank, 2), 27) for rank in range(2)]
    assert [s.local_lengths(lengths) for s in shards] == [[12, 2], [0, 14]]  # rank 1: 13 rows + 1 padding
    x = torch.arange(27.0)[:, None]
    local = [s.local(x) for s in shards]
    assert torch.equal(torch.cat(local)[:27], x) and local[1][-1].item() == 0
    assert TokenShard(_Rank(3, 4), 2).local_lengths([2]) == [1]  # more ranks than tokens: padding only


def test_dit_refuses_a_split_of_heads_it_cannot_make(references):
    dit = references("seedvr2_3b").dit  # 2 heads
    with pytest.raises(ValueError, match="divisible"):
        dit(**dit_inputs(dit.txt_in.in_features), sp=_Rank(0, 3))


# -- the VAE alone -----------------------------------------------------------------------------------

VAE_CASES = [(17, 4), (13, 4), (9, None), (1, 4)]  # (frames, temporal_chunk)


def vae_clip(frames: int) -> torch.Tensor:
    return torch.rand(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1


def _on_rank_vae(context, cases):
    """Encode and decode under SP, and the frame counts of the pieces the encoder's conv_in saw here."""
    vae = context.pipeline.vae
    results = []
    for frames, chunk in cases:
        vae.temporal_chunk = chunk
        pieces = []
        hook = vae.encoder.conv_in.register_forward_pre_hook(lambda _, args: pieces.append(args[0].size(2)))  # noqa: B023
        with torch.inference_mode():
            mean, logvar = vae.encode(vae_clip(frames), sp=context.sp)
            decoded = vae.decode(mean, sp=context.sp)
        hook.remove()
        results.append((mean, logvar, decoded, pieces))
    return results


def test_vae_context_parallel_matches(groups, references):
    reference = references("seedvr2_3b").vae
    per_rank = groups("seedvr2_3b").call(_on_rank_vae, VAE_CASES)
    for index, (frames, chunk) in enumerate(VAE_CASES):
        reference.temporal_chunk = chunk
        with torch.inference_mode():
            mean, logvar = reference.encode(vae_clip(frames))
            decoded = reference.decode(mean)
        plan = plan_pieces(frames, chunk, 4, SP)
        for rank, results in enumerate(per_rank):
            got_mean, got_logvar, got_decoded, pieces = results[index]
            for name, got, want in (("mean", got_mean, mean), ("logvar", got_logvar, logvar),
                                    ("decoded", got_decoded, decoded)):
                error = (got - want).abs().max().item()
                assert error <= 1e-4, f"{frames} frames, chunk {chunk}, rank {rank}: {name} error {error:.2e}"
            if len(plan) == 1:  # a single piece runs on rank 0 only
                assert pieces == ([frames] if rank == 0 else [])
            else:  # round-robin pieces; a rank without a piece in the last round runs a 1-frame stand-in
                slots = range(rank, math.ceil(len(plan) / SP) * SP, SP)
                assert pieces == [plan[i] if i < len(plan) else 1 for i in slots]


def _on_rank_vae_channels_last(context, cases):
    """_on_rank_vae with the VAE's CUDA conv layout (channels_last_3d), in float32 on the CPU."""
    vae = context.pipeline.vae
    vae.memory_format = torch.channels_last_3d
    try:
        return [(mean, logvar, decoded) for mean, logvar, decoded, _ in _on_rank_vae(context, cases)]
    finally:
        vae.memory_format = torch.contiguous_format


def test_vae_context_parallel_in_channels_last_3d_matches(groups, references):
    """The frames a piece receives from other ranks join its conv input in the conv layout; same result."""
    reference = references("seedvr2_3b").vae
    cases = VAE_CASES[:2]
    per_rank = groups("seedvr2_3b").call(_on_rank_vae_channels_last, cases)
    for index, (frames, chunk) in enumerate(cases):
        reference.temporal_chunk = chunk
        with torch.inference_mode():
            mean, logvar = reference.encode(vae_clip(frames))
            want = (mean, logvar, reference.decode(mean))
        for rank, results in enumerate(per_rank):
            for name, got, expected in zip(("mean", "logvar", "decoded"), results[index], want):
                error = (got - expected).abs().max().item()
                assert error <= 1e-4, f"{frames} frames, chunk {chunk}, rank {rank}: {name} error {error:.2e}"


@pytest.mark.parametrize("frames, chunk, ranks, expected", [
    (1, 4, 2, [1]),
    (5, 4, 2, [1, 4]),  # splits below the chunk so that both ranks work
    (17, 4, 2, [5, 4, 4, 4]),
    (13, None, 2, [5, 8]),  # the first piece, which also holds frame 0, gets the fewest units
    (17, None, 4, [5, 4, 4, 4]),
    (21, 8, 2, [5, 8, 8]),  # each piece within the chunk
    (26, 1, 4, [2] + [1] * 24),  # decoder: latent frames, the official 2 + 1 + 1 ...
])
def test_plan_pieces(frames, chunk, ranks, expected):
    unit = 1 if frames == 26 else 4
    assert plan_pieces(frames, chunk, unit, ranks) == expected


# -- failures and shutdown (last: they tear the 3B group down) ---------------------------------------

def test_a_killed_rank_fails_the_job_then_the_group_is_rebuilt(groups, references):
    group = groups("seedvr2_3b")
    old = group.pids

    def kill_rank_1(phase):
        if phase == "dit":  # rank 0 is inside the job and has not answered yet
            os.kill(old[1], signal.SIGKILL)
            while running(old[1]):
                time.sleep(0.01)

    started = time.monotonic()
    with pytest.raises(SequenceParallelError, match="rank 1 exited"):
        group.restore(clip(5), res_h=48, res_w=80, on_phase=kill_rank_1)
    assert time.monotonic() - started < 30
    assert not group.alive()
    assert not any(running(pid) for pid in old)  # the survivor was terminated too

    options = dict(res_h=48, res_w=80, sampling=Sampling(seed=3))
    out = group.restore(clip(5), **options)  # the next job starts a fresh group
    assert group.alive() and not set(group.pids) & set(old)
    off = (out.int() - references("seedvr2_3b").restore(clip(5), **options).int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() <= 1e-3


def test_close_leaves_no_process(groups):
    group = groups("seedvr2_3b")
    pids = group.pids
    group.close()
    group.close()  # idempotent
    assert not group.alive()
    assert not any(running(pid) for pid in pids)
    assert not {child.pid for child in multiprocessing.active_children()} & set(pids)
    with pytest.raises(RestoreError, match="closed"):
        group.restore(clip(1), res_h=48, res_w=80)


DRIVER = """
import json, time
from seedvr.spgroup.group import SequenceParallelGroup

if __name__ == "__main__":
    group = SequenceParallelGroup("seedvr2_7b", "normal", 2, device_kind="cpu")
    print(json.dumps(group.pids), flush=True)
    time.sleep(600)
"""


def test_ranks_end_when_their_driver_is_killed(installation, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(driver.stdout.readline())
        assert all(running(pid) for pid in pids)
    finally:
        driver.kill()  # SIGKILL: no atexit, no cleanup of its own
        driver.wait()
    deadline = time.monotonic() + 15
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids)
