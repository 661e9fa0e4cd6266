"""bf16 on the CPU (issue 9, item 5): the GPU's dtype policy runs in CI, judged against the float32 goldens."""

import json

import pytest
import torch
from safetensors.torch import load_file

from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.restorer import Sampling
from seedvr.tools.parity import BF16_MIN_PSNR_DB, build_dit, build_vae, main, psnr


def test_parity_bf16_reaches_the_psnr_floor_on_every_pipeline_run(golden, tmp_path, capsys):
    report = tmp_path / "bf16.json"
    code = main(["--dtype", "bfloat16", str(golden / "pipeline_tiny"), "--json", str(report)])
    lines = capsys.readouterr().out.splitlines()
    results = json.loads(report.read_text())["results"]
    runs = json.loads((golden / "pipeline_tiny" / "meta.json").read_text())["runs"]
    assert code == 0, "\n".join(lines)
    assert [(r["file"], r["name"]) for r in results] == [(f"{run}.safetensors", "final_uint8") for run in runs]
    assert all(BF16_MIN_PSNR_DB <= r["psnr_db"] < 80 and r["passed"] for r in results)  # < 80: not float32 by mistake
    assert all("psnr" in line for line in lines[:-1]) and lines[-1] == f"parity: {len(runs)} passed, 0 failed"


def test_parity_bf16_is_for_pipeline_cases_only(golden, capsys):
    with pytest.raises(SystemExit) as stopped:  # a usage error: said in one line, no traceback
        main(["--dtype", "bfloat16", str(golden / "dit3b_tiny")])
    assert stopped.value.code == 2 and "runs pipeline cases only" in capsys.readouterr().err


def test_the_psnr_of_equal_images_is_infinite_and_falls_with_the_error():
    image = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert psnr(image, image) == float("inf")
    off_by_one = image.clone()
    off_by_one[0, 0, 0, 0] ^= 1
    assert psnr(image, off_by_one) == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 * image.numel())).item())


def test_bf16_with_the_cuda_conv_layout_on_cpu_stays_at_the_golden(golden):
    """The GPU's whole precision and layout policy (bf16, channels_last_3d VAE), run on the CPU."""
    case = golden / "pipeline_tiny"
    dit_meta = json.loads((golden / "dit3b_tiny" / "meta.json").read_text())
    vae_meta = json.loads((golden / "vae_tiny" / "meta.json").read_text())
    dit = build_dit("dit3b_tiny", dit_meta["config"]["kwargs"], golden / "dit3b_tiny" / "weights.safetensors")
    vae = build_vae(vae_meta["config"]["kwargs"], golden / "vae_tiny" / "weights.safetensors").to(torch.bfloat16)
    text = load_file(case / "text_embeds.safetensors")
    runner = vae_meta["config"]["runner_vae_config"]
    pipeline = SeedVR2(dit.to_compute_dtype(torch.bfloat16), vae, text["pos"], text["neg"], device="cpu",
                       dtype=torch.bfloat16, scaling_factor=runner["scaling_factor"],
                       shifting_factor=runner["shifting_factor"])
    vae.memory_format = torch.channels_last_3d  # what SeedVR2 sets on a CUDA device
    settings = json.loads((case / "meta.json").read_text())["runs"]["video_cfg1_steps1"]
    run = load_file(case / "video_cfg1_steps1.safetensors")
    restored = pipeline.restore(run["frames_uint8"].permute(0, 2, 3, 1), res_h=settings["res_h"],
                                res_w=settings["res_w"], sampling=Sampling(seed=settings["seed"]),
                                eps=run["eps_posterior"], noise=run["noise"])
    assert psnr(restored, run["final_uint8"]) >= BF16_MIN_PSNR_DB
