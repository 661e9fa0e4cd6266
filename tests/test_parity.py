"""The parity runner on every golden case, on relocated copies, on broken weights, and on the manifests."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seedvr.tools.parity import SHARED_REFERENCE, main, target_problem

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = ["preprocess", "colorfix", "vae_tiny", "dit3b_tiny", "dit7b_tiny", "pipeline_tiny"]


def run_parity(target, tmp_path, capsys) -> tuple[int, dict, list[str]]:
    report = tmp_path / "report.json"
    code = main([str(target), "--json", str(report)])
    return code, json.loads(report.read_text()), capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_command_line_passes_and_writes_json(golden, tmp_path):
    report = tmp_path / "colorfix.json"
    process = subprocess.run([sys.executable, "-m", "seedvr.parity", str(golden / "colorfix"), "--json", str(report)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout + process.stderr
    lines = process.stdout.splitlines()
    assert lines[-1] == "parity: 2 passed, 0 failed"
    assert all(line.endswith("PASS") for line in lines[:-1])
    data = json.loads(report.read_text())
    assert data["case"] == "colorfix" and (data["passed"], data["failed"]) == (2, 0)
    assert [(r["file"], r["name"], r["passed"]) for r in data["results"]] == [
        ("case.safetensors", "output", True), ("case.safetensors", "output_small", True)]
    assert all(r["max_abs"] <= 1e-5 and r["max_rel"] <= 1e-5 for r in data["results"])


@pytest.mark.parametrize("case", CASES)
def test_every_golden_case_passes(golden, tmp_path, capsys, case):
    code, report, lines = run_parity(golden / case, tmp_path, capsys)
    print("\n".join(lines), file=sys.stderr)
    assert code == 0 and report["failed"] == 0 and report["case"] == case
    outputs = {(file, name) for file, info in json.loads((golden / case / "meta.json").read_text())["files"].items()
               for name, tensor in info["tensors"].items() if tensor["role"] == "output"}
    compared = {(r["file"], r["name"]) for r in report["results"] if r["passed"]}
    assert report.get("skipped", 0) == 0
    if case == "dit3b_tiny":  # the batch golden: sample 0 compared as vid_sample, sample 1 with our own run
        assert ("case_batch2.safetensors", "vid_sample_packing_invariance") in compared
    assert outputs <= compared, f"outputs not compared: {outputs - compared}"
    assert lines[-1] == f"parity: {report['passed']} passed, 0 failed"


def test_pipeline_case_works_from_any_directory_layout(golden, tmp_path, capsys):
    """A copy whose models live elsewhere: they are found through meta.json, not through fixed names."""
    case = tmp_path / "cases" / "my_pipeline"
    shutil.copytree(golden / "pipeline_tiny", case)
    shutil.copytree(golden / "dit3b_tiny", tmp_path / "models" / "dit")
    shutil.copytree(golden / "vae_tiny", tmp_path / "models" / "vae")
    meta = json.loads((case / "meta.json").read_text())
    meta["models"]["dit"] = "../../models/dit/weights.safetensors"
    meta["models"]["vae"] = "../../models/vae/weights.safetensors"
    meta["runs"] = {"image_cfg1_steps1": meta["runs"]["image_cfg1_steps1"]}  # keep the test fast
    (case / "meta.json").write_text(json.dumps(meta))
    code, report, _ = run_parity(case, tmp_path, capsys)
    assert code == 0 and report["passed"] >= 19 and report["failed"] == 0


def test_perturbed_weights_fail(golden, tmp_path, capsys):
    case = tmp_path / "dit7b_copy"
    shutil.copytree(golden / "dit7b_tiny", case)
    weights = load_file(case / "weights.safetensors")
    key = "blocks.2.attn.proj_qkv.vid.weight"
    weights[key] = weights[key] * 1.01
    save_file(weights, case / "weights.safetensors")
    code, report, lines = run_parity(case, tmp_path, capsys)
    # the exact float32 rows catch a 1 % change of one weight; the bf16-rounded rows' 2e-3 tolerance does not
    exact = [r for r in report["results"] if r["name"] == "vid_sample"]
    assert code == 1 and len(exact) == 3 and not any(r["passed"] for r in exact)
    assert report["failed"] == 3 and sum(line.endswith("FAIL") for line in lines) == 3
    assert lines[-1] == f"parity: {report['passed']} passed, 3 failed"


def test_weights_of_the_wrong_shape_fail_with_the_key_named(golden, tmp_path, capsys):
    case = tmp_path / "dit3b_wrong_shape"
    shutil.copytree(golden / "dit3b_tiny", case)
    weights = load_file(case / "weights.safetensors")
    weights["vid_in.proj.bias"] = torch.zeros(65)
    save_file(weights, case / "weights.safetensors")
    code, report, lines = run_parity(case, tmp_path, capsys)
    assert code == 1 and (report["passed"], report["failed"]) == (0, 1)
    assert "shape of vid_in.proj.bias: expected 64, got 65" in report["results"][0]["note"]
    assert lines[-1] == "parity: 0 passed, 1 failed"


@pytest.mark.parametrize("manifest, keys", [("dit_3b.tsv", 635), ("dit_7b.tsv", 1128), ("vae.tsv", 250)])
def test_full_size_models_match_the_manifests(reference, tmp_path, capsys, manifest, keys):
    code, report, lines = run_parity(reference / "manifests" / manifest, tmp_path, capsys)
    assert code == 0 and report["failed"] == 0 and report["passed"] == len(report["results"]) > 10
    assert sum(int(result["note"].removesuffix(" keys")) for result in report["results"]) == keys
    assert lines[-1] == f"parity: {report['passed']} passed, 0 failed"


def test_manifest_mismatches_are_named(reference, tmp_path, capsys):
    lines = (reference / "manifests" / "vae.tsv").read_text().splitlines()
    edited = [line for line in lines if not line.startswith("decoder.conv_out.bias\t")]
    edited = [line.replace("\t512x16x3x3x3\t", "\t512x16x1x3x3\t") for line in edited]
    manifest = tmp_path / "vae.tsv"
    manifest.write_text("\n".join(edited) + "\n")
    code, report, output = run_parity(manifest, tmp_path, capsys)
    assert code == 1 and report["failed"] == 2
    text = "\n".join(output)
    assert "shape of decoder.conv_in.weight: expected 512x16x1x3x3, got 512x16x3x3x3" in text
    assert "unexpected decoder.conv_out.bias (shape 3)" in text


def test_a_missing_target_names_the_reference_folder_and_exits_2_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "shared" / "reference" / "golden" / "pipeline_tiny")])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert f"{tmp_path}/shared/reference/golden/pipeline_tiny does not exist" in message
    assert f"python -m seedvr.parity {SHARED_REFERENCE}/golden/pipeline_tiny" in message


def test_a_folder_that_is_not_a_case_is_named_as_such(golden, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(golden)])
    assert stopped.value.code == 2
    assert f"{golden} is a folder without meta.json, so not a golden case directory" in capsys.readouterr().err


def test_without_the_reference_folder_the_message_says_where_it_lives(tmp_path):
    """A fresh clone on a machine without the workplace's shared/ folder."""
    absent = tmp_path / "shared" / "reference"
    message = target_problem(Path("no/such/golden/pipeline_tiny"), reference=absent)
    assert message is not None
    assert "does not exist (relative paths start from" in message
    assert f"this workplace keeps it in shared/reference/ next to the checkout ({absent}), which this machine lacks" \
        in message


def test_the_reference_folder_lists_what_can_be_checked(reference):
    message = target_problem(Path("nowhere"), reference=reference)
    assert message is not None and f"it is in {reference}, holding golden/colorfix, " in message
    assert "manifests/dit_3b.tsv, manifests/dit_7b.tsv, manifests/vae.tsv" in message
    assert target_problem(reference / "golden" / "colorfix") is None
    assert target_problem(reference / "manifests" / "vae.tsv") is None

