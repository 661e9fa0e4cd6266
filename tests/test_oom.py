"""Surviving CUDA out-of-memory, on CPU: the memory plan's simulated device (SEEDVR_TEST_MEMORY_BUDGET_BYTES)
raises a genuine torch.OutOfMemoryError when a phase's planned working set exceeds the budget; the real
handler must retry with smaller plans, record them, answer OUT_OF_MEMORY with a size that fits when
nothing does, and serve the next job with nothing of the failed one left alive."""

import base64
import gc
import weakref
from fractions import Fraction

import pytest
import torch
from media_factory import pattern_frames, write_video
from torch._subclasses.fake_tensor import FakeTensor

import handler as worker
from seedvr.engine import memory_plan
from seedvr.engine.memory_plan import Footprint, Wishes, candidates, estimate
from seedvr.io.media.video import probe_video
from seedvr.serving import jobs

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane

FRAMES, HEIGHT, WIDTH = 12, 48, 64
SCALE = 1.3  # the simulated device needs 30% more than the plan estimated


@pytest.fixture(scope="module")
def handler(tiny_handler):
    return tiny_handler


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, pattern_frames(FRAMES, WIDTH, HEIGHT), Fraction(25))
    return base64.b64encode(path.read_bytes()).decode()


def restore(handler, clip, tmp_path, **fields):
    answer = handler({"id": "oom-test", "input": {"action": "restore", "media": clip, **fields}})
    if "error" in answer:
        return answer, None
    out = tmp_path / "out.mp4"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    return answer, probe_video(out)


def footprint() -> Footprint:
    return worker.HOLDER.current.restorer.footprint()


def smallest_peak(frames: int, size: tuple[int, int]) -> int:
    return min(estimate(plan, footprint(), frames, (HEIGHT, WIDTH), size).peak
               for plan in candidates(frames, size, Wishes()))


def live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    for thing in gc.get_objects():
        # FakeTensors: what torch.compile traced with (another test may have compiled); they hold no memory
        if issubclass(type(thing), torch.Tensor) and not thing.is_meta and not isinstance(thing, FakeTensor):
            storage = thing.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_a_failed_attempt_keeps_nothing_alive():
    held = []

    def attempt():
        big = torch.ones(1 << 20)
        held.append(weakref.ref(big))

        def allocate(tensor):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

        allocate(big)

    result, failure = jobs._out_of_memory(attempt)
    assert result is None and failure == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert held[0]() is None  # gone at once: no traceback, frame or exception keeps it


def test_retries_with_smaller_plans_until_one_fits(handler, clip, tmp_path, monkeypatch):
    answer, _ = restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH)  # loads the model, no budget
    assert answer["processing_info"]["retries"] == []
    whole, guess = memory_plan.choose(footprint(), 10**15, FRAMES, (HEIGHT, WIDTH), (HEIGHT, WIDTH))
    assert whole.chunk_frames is None
    budget = guess.peak  # the plan believes the whole clip fits; the device needs 30% more
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES", str(budget))
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_SCALE", str(SCALE))

    answer, video = restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH)
    assert "error" not in answer, answer
    info = answer["processing_info"]
    retries = info["retries"]
    assert retries and retries[0]["plan"] == whole.describe()
    for retry in retries:  # each failed for a reason: its working set really exceeds the device
        assert retry["estimated_peak_bytes"] * SCALE > budget
        assert retry["error"].startswith("CUDA out of memory (simulated")
    for earlier, later in zip(retries, retries[1:]):
        assert later["estimated_peak_bytes"] <= memory_plan.RETRY_SHRINK * earlier["estimated_peak_bytes"]
    assert info["plan"]["estimated_peak_bytes"] * SCALE <= budget
    assert info["plan"]["memory_budget_bytes"] == budget
    assert video.frame_count == FRAMES


def test_out_of_memory_names_a_size_that_fits_and_the_next_job_succeeds(handler, clip, tmp_path, monkeypatch):
    restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH)  # model loaded, lazy caches built
    before = live_tensor_bytes()
    big = (96, 128)
    budget = (smallest_peak(FRAMES, big) + smallest_peak(FRAMES, (HEIGHT, WIDTH))) // 2
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES", str(budget))

    answer, _ = restore(handler, clip, tmp_path, res_h=big[0], res_w=big[1])
    error = answer["error"]
    assert error.startswith("OUT_OF_MEMORY: a 128x96 output of 12 frames does not fit"), error
    assert "Traceback" not in error and len(error) < 600
    suggested = error.split("at most ")[1].split(" for 12 frames")[0]
    width, height = (int(side) for side in suggested.split("x"))
    assert 16 <= height < 96 and 16 <= width < 128
    assert live_tensor_bytes() == before  # nothing of the failed job is left

    answer, video = restore(handler, clip, tmp_path, res_h=height, res_w=width)  # the suggestion fits
    assert "error" not in answer, answer
    assert answer["processing_info"]["retries"] == []
    assert video.height <= height and video.width <= width and video.frame_count == FRAMES
    monkeypatch.delenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES")
    answer, video = restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH)
    assert "error" not in answer and video.frame_count == FRAMES


def test_pinned_options_are_kept_on_retries_and_named_when_nothing_fits(handler, clip, tmp_path, monkeypatch):
    restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH)
    pinned = Wishes(chunk_frames=9, chunk_overlap=1, dit_offload=False)
    peaks = [estimate(plan, footprint(), FRAMES, (HEIGHT, WIDTH), (HEIGHT, WIDTH)).peak
             for plan in candidates(FRAMES, (HEIGHT, WIDTH), pinned)]
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES", str(min(peaks) - 1))
    answer, _ = restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH, chunk_frames=9, chunk_overlap=1,
                        dit_offload=False)
    assert answer["error"].startswith("OUT_OF_MEMORY: ")
    assert "chunk_frames, chunk_overlap, dit_offload allow (leave them out" in answer["error"]
    monkeypatch.delenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES")
    answer, _ = restore(handler, clip, tmp_path, res_h=HEIGHT, res_w=WIDTH, chunk_frames=9, chunk_overlap=1,
                        dit_offload=False)
    plan = answer["processing_info"]["plan"]
    assert (plan["chunk_frames"], plan["chunk_overlap"], plan["dit_offload"], plan["chunks"]) == (9, 1, False, 2)
