"""Pairwise combination matrix through the real runpod local API, on the tiny random-weight installation.

Factors: the media (an image, a video, or a list of both), sp_size (2 runs a gloo group of two rank
processes on CPU), temporal chunking, DiT block offload, VAE tiling, the output delivery (base64, or
a presigned URL into a moto S3 bucket), frame interpolation (2x, which only a video takes) and deinterlacing
(auto finds this progressive clip progressive, off does not look: both exact), and the restoration strength
cond_noise_scale (0 or 0.3, each compared with the plain path at the same strength). A small greedy
generator picks combinations so that every pair of values of any two factors that can meet appears in at least
one of them (checked by `test_pairwise_covers_every_pair`). An interpolated video keeps every restored frame
as it is, at every other place: those frames are compared with the plain path like any other.

Every combination must complete, and every item must decode to the expected size and frame count. The
combinations without tiling must reproduce the "plain" path (sp_size 1, no offload, no tiling, base64)
for the same media and chunking: offload and delivery are exact, sequence parallelism differs only by
the order of float reductions. VAE tiles are approximate: tiled results get only a loose bound.

Combinations are ordered so that sp_size changes once (each change reloads the model).
"""

import base64
import io
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import S3_BUCKET
from media_factory import H264, make_image, pattern_frames, write_video
from PIL import Image
from worker_server import WorkerServer, make_job_tmp, tiny_environment

from seedvr.io.media.video import probe_video, read_frames

pytestmark = pytest.mark.slow

# ----------------------------------------------------------------------------- the pairwise generator


def all_pairs(factors: dict[str, tuple]) -> set[tuple]:
    """Every ((factor, value), (other factor, value)) pair, factors in declaration order."""
    names = list(factors)
    return {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]}


def pairs_of(row: dict, factors: dict[str, tuple]) -> set[tuple]:
    names = list(factors)
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}


def pairwise(factors: dict[str, tuple], can_meet: Callable[[dict], bool] = lambda row: True) -> list[dict]:
    """Deterministic greedy covering array of strength 2: repeatedly take the row of the full cartesian
    product that covers the most pairs still uncovered; ties go to the row whose values were used least
    so far (spreads the values), then to the first in declaration order. Rows that `can_meet` refuses are
    never taken, and the pairs that only they hold need no cover."""
    names = list(factors)
    candidates = [row for values in itertools.product(*factors.values()) if can_meet(row := dict(zip(names, values)))]
    uncovered = all_pairs(factors) & set().union(*(pairs_of(row, factors) for row in candidates))  # that can meet
    used = Counter()
    rows = []
    while uncovered:
        best = max(candidates, key=lambda row: (len(pairs_of(row, factors) & uncovered),
                                                -sum(used[name, row[name]] for name in names)))
        rows.append(best)
        uncovered -= pairs_of(best, factors)
        used.update((name, best[name]) for name in names)
    return rows


FACTORS = {
    "media": ("image", "video", "list"),
    "sp_size": (1, 2),
    "chunking": ("whole", "chunked"),
    "dit_offload": (False, True),
    "vae_tiling": (False, True),
    "delivery": ("base64", "url"),
    "interpolate_factor": (1, 2),  # 2: ffmpeg's mci (auto: the tiny installation has no RIFE weights)
    "deinterlace": ("auto", "off"),  # on this progressive clip auto finds no interlacing: exact either way
    "cond_noise_scale": (0.0, 0.3),  # restoration strength: compared with the plain path at the same strength
}


def can_meet(row: dict) -> bool:
    """Interpolation applies to videos: an image alone refuses it (a list interpolates its video)."""
    return row["media"] != "image" or row["interpolate_factor"] == 1


def ordered(rows: list[dict]) -> list[dict]:
    """sp_size changes once (a change reloads the model); within it whole clips first (stable otherwise)."""
    return sorted(rows, key=lambda row: (row["sp_size"], row["chunking"] == "chunked"))


COMBINATIONS = ordered(pairwise(FACTORS, can_meet))


def combination_id(row: dict) -> str:
    return "-".join([row["media"], f"sp{row['sp_size']}", row["chunking"],
                     "offload" if row["dit_offload"] else "resident",
                     "tiled" if row["vae_tiling"] else "untiled", row["delivery"], f"x{row['interpolate_factor']}",
                     f"deinterlace-{row['deinterlace']}", f"strength{row['cond_noise_scale']}"])


PLAIN = {"sp_size": 1, "dit_offload": False, "vae_tiling": False, "delivery": "base64", "interpolate_factor": 1,
         "deinterlace": "auto"}
STRENGTHS = FACTORS["cond_noise_scale"]


def test_pairwise_covers_every_pair():
    """Checked independently of the generator: each pair of values of any two factors occurs in some row."""
    for factors in (FACTORS, {"a": (1, 2, 3), "b": "xyz", "c": (0, 1), "d": (0, 1), "e": (0, 1, 2, 3)}):
        rows = pairwise(factors)
        assert rows == pairwise(factors)  # deterministic
        for first, second in itertools.combinations(factors, 2):
            for x, y in itertools.product(factors[first], factors[second]):
                assert any(row[first] == x and row[second] == y for row in rows), (first, x, second, y)
        assert all(set(row) == set(factors) for row in rows)
        assert all(row[name] in factors[name] for row in rows for name in factors)
        # any covering array needs at least (largest level count) x (second largest) rows
        largest, second_largest = sorted((len(values) for values in factors.values()), reverse=True)[:2]
        assert largest * second_largest <= len(rows) < math.prod(len(values) for values in factors.values())
    # pairs that can meet are all covered (by rows that can happen), the one pair that cannot is not asked for
    rows = pairwise(FACTORS, can_meet)
    every = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]
    assert all(can_meet(row) for row in rows)
    for first, second in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[first], FACTORS[second]):
            possible = any(can_meet(row) and row[first] == x and row[second] == y for row in every)
            assert possible == any(row[first] == x and row[second] == y for row in rows), (first, x, second, y)
    assert not can_meet({"media": "image", "interpolate_factor": 2}) and len(rows) == 10  # greedy; 6 at the least
    assert sorted(map(combination_id, COMBINATIONS)) == sorted(map(combination_id, rows))
    assert len({combination_id(row) for row in COMBINATIONS}) == len(COMBINATIONS)
    sp_changes = sum(1 for a, b in itertools.pairwise(COMBINATIONS) if a["sp_size"] != b["sp_size"])
    assert sp_changes == 1 and COMBINATIONS[0]["sp_size"] == 1


# ----------------------------------------------------------------------------- media and requests


class Short(dict):
    """A dict that pytest's tracebacks show as its keys only (it holds base64 media or decoded frames)."""

    def __repr__(self) -> str:
        return f"<{len(self)} entries: {', '.join(map(str, self))}>"


VIDEO_FRAMES = 13  # > chunk_frames: with 5 and an overlap of 1 the clip is cut into 3 chunks
CHUNKING = {"whole": {}, "chunked": {"chunk_frames": 5, "chunk_overlap": 1}}
TILE = 64  # the smallest tile the schema takes; smaller than both output sides, so tiles really happen
RES_H, RES_W = 96, 128
# Both inputs are 64x48 (media_factory); the output area 96*128 is 4x theirs: 128x96, multiples of 16.
EXPECTED_WIDTH, EXPECTED_HEIGHT = 128, 96
ITEMS = {"image": ("image",), "video": ("video",), "list": ("image", "video")}

# Bounds, in uint8 levels, against the plain result. In one process (sp_size 1) offload and delivery change
# nothing: identical frames. Two ranks differ from one process by the order of float reductions: a few
# values a step apart before encoding, which H.264 (crf 0, yuv420p) spreads over a pixel's channels.
# Measured on the tiny model (13 frames of 128x96): video max 3 (whole clip) / 2 (chunked), mean 1.2e-4,
# 8e-5 of the values changed; images identical.
SP_MAX_ABS, SP_MEAN_ABS, SP_CHANGED = 6, 0.005, 0.001
TILED_MEAN_ABS = 12.0  # tiles are approximate (measured: mean 7.0 to 8.3, max up to 177): the mean only


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    """{"image": base64 of an RGBA PNG, "video": base64 of a 13-frame H.264 clip}, both 64x48."""
    folder = tmp_path_factory.mktemp("matrix-media")
    image, _, _ = make_image(folder, "rgba_png")
    video = write_video(folder / "clip.mp4", pattern_frames(VIDEO_FRAMES), Fraction(24),
                        H264 + ("-crf", "0"))
    assert probe_video(video).frame_count == VIDEO_FRAMES
    return Short(image=base64.b64encode(image.read_bytes()).decode(),
                 video=base64.b64encode(video.read_bytes()).decode())


@pytest.fixture(scope="module")
def job_tmp() -> Path:
    return make_job_tmp()


@pytest.fixture(scope="module")
def server(tiny_dir, s3_endpoint, job_tmp, tmp_path_factory):
    env = tiny_environment(tiny_dir, job_tmp)
    env.update(BUCKET_ENDPOINT_URL=f"{s3_endpoint}/{S3_BUCKET}", BUCKET_ACCESS_KEY_ID="key",
               BUCKET_SECRET_ACCESS_KEY="secret")
    env.pop("RUNPOD_WEBHOOK_POST_OUTPUT", None)
    worker = WorkerServer(env, tmp_path_factory.mktemp("matrix-log") / "worker.log")
    # what the worker process itself keeps in the temporary folder (diffusers' import makes a torch cache there)
    worker.startup_files = set(job_tmp.iterdir())
    yield worker
    worker.stop()


def restore_request(row: dict, media: dict) -> dict:
    kinds = ITEMS[row["media"]]
    request = {"action": "restore", "model_type": "seedvr2_3b", "res_h": RES_H, "res_w": RES_W,
               "codec": "h264", "crf": 0, "pix_fmt": "yuv420p", "format": "png",
               "sp_size": row["sp_size"], "dit_offload": row["dit_offload"], "output_delivery": row["delivery"],
               **CHUNKING[row["chunking"]]}
    request["media"] = media[kinds[0]] if len(kinds) == 1 else [media[kind] for kind in kinds]
    if row["vae_tiling"]:
        request.update(vae_tiling=True, vae_tile_size=TILE)
    else:
        request["vae_tiling"] = False
    if row["interpolate_factor"] != 1:
        request["interpolate_factor"] = row["interpolate_factor"]
    if row["deinterlace"] != "auto":
        request["deinterlace"] = row["deinterlace"]
    if row["cond_noise_scale"]:
        request["cond_noise_scale"] = row["cond_noise_scale"]
    return request


def decode(kind: str, data: bytes, folder: Path) -> np.ndarray:
    """An image as (1, h, w, 4) RGBA, a video as (frames, h, w, 3), uint8."""
    if kind == "image":
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "RGBA", (image.format, image.mode)
        return np.asarray(image)[None]
    path = folder / "restored.mp4"
    path.write_bytes(data)
    info = probe_video(path)
    assert info.codec == "h264", info
    return read_frames(path, info)


def worker_exception(server, job_id: str) -> str:
    """The exception the worker logged for `job_id`, when its log holds a traceback (INTERNAL errors say
    only "details are in the worker log"); "" otherwise."""
    text = server.log_path.read_text(errors="replace")
    start = text.find(f"job {job_id} failed")
    if start < 0:
        return ""
    section = text[start:text.find("Handler output", start)].splitlines()[1:]
    raised = [line for line in section if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
    return f"\nworker log: {raised[-1]}" if raised else ""


def run(server, row: dict, media: dict, folder: Path) -> tuple[dict, list[np.ndarray]]:
    """Restore one combination; check that it completed, the shape of each item; return the decoded items."""
    label = combination_id(row)
    answer = server.runsync(restore_request(row, media))
    if answer.get("status") != "COMPLETED":
        pytest.fail(f"{label}: job {answer.get('status')}: {str(answer.get('error'))[:600]}"
                    f"{worker_exception(server, str(answer.get('id')))}", pytrace=False)
    output = answer["output"]
    kinds = ITEMS[row["media"]]
    assert output["success"] is True, label
    assert output["processing_info"]["sequence_parallel_size"] == row["sp_size"], label
    if len(kinds) > 1:
        assert output["media_types"] == list(kinds), label
        resolutions = output["resolutions"]
        infos = output["processing_info"]["items"]
    else:
        assert output["media_type"] == kinds[0], label
        resolutions = [output["resolution"]]
        infos = [output["processing_info"]]
    plans = [info["plan"] for info in infos]
    assert len(output["media"]) == len(kinds) and len(resolutions) == len(kinds), label
    decoded = []
    for index, kind in enumerate(kinds):
        if row["delivery"] == "url":
            assert output["media"][index] is None, label
            url = output["media_urls"][index]
            assert S3_BUCKET in url, (label, url)
            response = requests.get(url, timeout=30)
            assert response.status_code == 200, (label, response.status_code, response.text[:300])
            data = response.content
        else:
            assert "media_urls" not in output, label
            data = base64.b64decode(output["media"][index], validate=True)
        frames = decode(kind, data, folder)
        assert resolutions[index] == f"{EXPECTED_WIDTH}x{EXPECTED_HEIGHT}", (label, index, resolutions)
        expected_frames = 1 if kind == "image" else VIDEO_FRAMES * row["interpolate_factor"]
        assert frames.shape[:3] == (expected_frames, EXPECTED_HEIGHT, EXPECTED_WIDTH), (label, index, frames.shape)
        if kind == "video" and row["interpolate_factor"] != 1:  # 2N frames at twice the rate, made by mci
            assert infos[index]["interpolation"] == {"method": "mci", "factor": 2.0, "output_fps": "48",
                                                     "frames": 2 * VIDEO_FRAMES, "source_frames": VIDEO_FRAMES}, label
        else:
            assert "interpolation" not in infos[index], (label, index)
        if kind == "video":  # auto looked and found the pattern clip progressive; off did not look
            found = "progressive" if row["deinterlace"] == "auto" else None
            assert infos[index]["interlace"] == {"found": found, "deinterlaced": None}, (label, infos[index])
        # what the worker reports it did (processing_info.plan, README "memory plan")
        plan = plans[index]
        assert plan["vae_tile"] == (TILE if row["vae_tiling"] else None), (label, index, plan)
        assert plan["dit_offload"] is row["dit_offload"], (label, index, plan)
        chunked = kind == "video" and row["chunking"] == "chunked"
        assert plan["chunks"] == (3 if chunked else 1), (label, index, plan)
        decoded.append(frames)
    return output, decoded


def differences(frames: np.ndarray, reference: np.ndarray) -> tuple[int, float, float]:
    """(max abs difference, mean abs difference, fraction of values that differ), uint8 levels."""
    assert frames.shape == reference.shape, (frames.shape, reference.shape)
    difference = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    return int(difference.max()), float(difference.mean()), float((difference > 0).mean())


MEASURED: dict[str, list[str]] = {}  # combination id -> per item "kind: max/mean", printed at the end


@pytest.fixture(scope="module")
def plain(server, media, tmp_path_factory) -> dict[tuple[str, str, float], np.ndarray]:
    """{(kind, chunking, cond_noise_scale): decoded frames} of the plain path (sp_size 1, resident, untiled,
    base64)."""
    folder = tmp_path_factory.mktemp("plain")
    results = Short()
    for kind in ("image", "video"):
        for chunking in CHUNKING:
            for strength in STRENGTHS:
                row = {**PLAIN, "media": kind, "chunking": chunking, "cond_noise_scale": strength}
                _, (frames,) = run(server, row, media, folder)
                results[kind, chunking, strength] = frames
    for key, frames in results.items():  # random weights still give detailed, non-constant results
        rgb = frames[..., :3]
        assert rgb.std() > 5 and len(np.unique(rgb)) > 50, (key, rgb.std())
    video_chunk_max, video_chunk_mean, _ = differences(results["video", "chunked", 0.0],
                                                       results["video", "whole", 0.0])
    print(f"\nplain video, chunked vs whole clip: max {video_chunk_max}, mean {video_chunk_mean:.3f}")
    assert video_chunk_mean > 1.0, "chunk_frames did not change the video: no chunking happened?"
    for kind in ("image", "video"):  # the strength really changes what comes out
        assert differences(results[kind, "whole", STRENGTHS[1]], results[kind, "whole", 0.0])[1] > 1.0, kind
    # an image is one frame, shorter than any chunk: the chunk fields change nothing
    for strength in STRENGTHS:
        assert np.array_equal(results["image", "chunked", strength], results["image", "whole", strength])
    return results


@pytest.mark.parametrize("row", COMBINATIONS, ids=combination_id)
def test_combination(server, media, plain, job_tmp, tmp_path, row):
    label = combination_id(row)
    _, decoded = run(server, row, media, tmp_path)
    figures = []
    for kind, frames in zip(ITEMS[row["media"]], decoded):
        reference = plain[kind, row["chunking"], row["cond_noise_scale"]]
        if kind == "video":  # interpolated: every source frame is kept as it is, at its place (k = i * factor)
            frames = frames[::row["interpolate_factor"]]
        largest, mean, changed = differences(frames, reference)
        figures.append(f"{kind}: max {largest} mean {mean:.5f} changed {changed:.5f}")
        if row["vae_tiling"]:
            assert 0 < mean <= TILED_MEAN_ABS, f"{label} {kind}: tiled vs plain: max {largest}, mean {mean:.4f}"
        elif row["sp_size"] == 1:
            assert largest == 0, f"{label} {kind}: differs from plain: max {largest}, mean {mean:.4f}"
        else:
            assert largest <= SP_MAX_ABS and mean < SP_MEAN_ABS and changed < SP_CHANGED, \
                f"{label} {kind}: differs from plain: max {largest}, mean {mean:.5f}, changed {changed:.5f}"
    MEASURED[label] = figures
    print(f"\n{label}: {'; '.join(figures)}")
    # no job folder or download left behind (a live sp group keeps its store folder, checked at the end)
    left = {path.name for path in set(job_tmp.iterdir()) - server.startup_files
            if not path.name.startswith("seedvr-sp-")}
    assert not left, (label, left)


def test_no_leftover_files_after_the_matrix(server, job_tmp):
    """Back to sp_size 1 (which closes any sequence-parallel group): the temporary folder is as at start-up."""
    answer = server.runsync({"action": "initialize", "model_type": "seedvr2_3b", "sp_size": 1})
    assert answer["status"] == "COMPLETED" and answer["output"]["ready"] is True, answer
    assert set(job_tmp.iterdir()) == server.startup_files
    print("\nmeasured against the plain path:")
    for label, figures in MEASURED.items():
        print(f"  {label}: {'; '.join(figures)}")
