"""`benchmarks/gpu_suite.py --tiny`: the GPU day's checks run on the CPU, so the suite never rots unrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_BUDGET_S = 180  # issue 9: `--tiny` runs in under 3 minutes (about 1 minute on the 2-core CI machine)
PHASES = {"preprocess", "vae_encode", "dit", "vae_decode", "postprocess"}


@pytest.mark.slow
def test_the_tiny_suite_runs_every_check_and_prints_json_lines():
    process = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=2 * TINY_BUDGET_S)
    lines = [json.loads(line) for line in process.stdout.splitlines()]  # every line is one JSON object
    assert process.returncode == 0, process.stdout + process.stderr[-3000:]
    by_check: dict[str, list[dict]] = {}
    for line in lines:
        by_check.setdefault(line["check"], []).append(line)
    assert list(by_check) == ["environment", "vae_conv", "dit_precision", "attention", "pipeline", "oom", "summary"]
    assert all(line["ok"] for line in lines), [line for line in lines if not line["ok"]]

    environment = by_check["environment"][0]
    assert environment["scale"] == "tiny" and environment["cudnn_affected_range"] is False
    layouts = by_check["vae_conv"][0]["layouts"]
    assert set(layouts) == {"contiguous", "channels_last_3d"}
    assert layouts["channels_last_3d"]["output_channels_last"] and all(entry["seconds"] > 0 for entry in layouts.values())
    models = by_check["dit_precision"][0]["models"]
    assert set(models) == {"3b", "7b"} and all(0 < entry["rel_error"] < 0.05 for entry in models.values())
    assert "flash-attn" in by_check["attention"][0]["skipped"]

    pipelines = by_check["pipeline"]
    assert [(line["model"], line["output"]) for line in pipelines] == [("3b", "256x144"), ("7b", "256x144"),
                                                                      ("7b", "384x208")]
    for line in pipelines:
        assert set(line["seconds"]) == PHASES and line["frames_per_second"] > 0
        assert line["estimate_peak_bytes"] > 0 and set(line["memory"]) == PHASES - {"postprocess"}
    assert pipelines[0]["dit_offload"]["equal"]

    oom = by_check["oom"][0]
    assert "can't allocate memory" in oom["error"] and oom["restores_after"]
    assert oom["live_tensors_after"] <= oom["live_tensors_before"]
    summary = by_check["summary"][0]
    assert summary["failed"] == [] and summary["checks"] == len(lines) - 1 and summary["seconds"] < TINY_BUDGET_S
