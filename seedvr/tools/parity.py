"""Parity with the official SeedVR2 code: golden tensors on tiny models, key sets of the full-size models.

    python -m seedvr.parity CASE_DIR [--json OUT]       a golden case directory (meta.json + .safetensors)
    python -m seedvr.parity MANIFEST.tsv [--json OUT]   dit_3b.tsv, dit_7b.tsv or vae.tsv
    python -m seedvr.parity --dtype bfloat16 PIPELINE_CASE_DIR

Prints one line per compared tensor (or manifest key group) and a last line `parity: N passed, M failed`;
exits 0 only if nothing failed. Everything runs on CPU in float32, as the goldens were made.
max_rel is max |ours − golden| / max |golden|.

The reference data is not in the repository: it is the folder `shared/reference/` next to the checkout
(`../shared/reference/` from the repository root), with golden/<case>/ and manifests/<name>.tsv. A target
that is not there ends the run with a message saying so (exit status 2).

`--dtype bfloat16` runs a pipeline case under the GPU's dtype policy, on the CPU (bf16 Linear layers with
float32 norms, rope and modulation; a bf16 VAE), with the golden's posterior eps and x_T noise injected (a bf16
draw need not follow the float32 stream), and compares only `final_uint8`: its PSNR must reach BF16_MIN_PSNR_DB.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from seedvr.engine.checkpoint import compare_with_manifest, load_strict, read_manifest, read_state_dict
from seedvr.engine.colorfix import color_fix
from seedvr.engine.loader import build_models, load_config
from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.preprocess import preprocess
from seedvr.engine.restorer import Sampling
from seedvr.errors import CheckpointError
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.dit7b import NaDiT7B
from seedvr.models.vae import VideoAutoencoder

DIT_ATOL = 1e-4
DIT_BF16_QKV_ATOL = 2e-3
VAE_ATOL = 1e-4
PREPROCESS_ATOL = 1e-5
COLORFIX_ATOL = 1e-5
PIPELINE_ATOL = 1e-4
UINT8_MAX_OFF_FRACTION = 1e-3  # final_uint8: off by at most 1 in at most 0.1 % of the values
# bf16 pipeline: final_uint8 PSNR floor. Issue 9's bound: bf16 rounding of the tiny models measured about 47 dB
# (this tool prints the figure), an error in the dtype policy (a norm or the sampler in bf16) far less.
BF16_MIN_PSNR_DB = 40.0
UINT8_PEAK = 255.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DIT_CLASSES: dict[str, type[NaDiT3B | NaDiT7B]] = {"dit3b_tiny": NaDiT3B, "dit7b_tiny": NaDiT7B}  # golden case -> class
BF16_QKV_FLAG = "round_qkv_to_bf16"  # model attribute that keeps the official bf16 cast of q, k, v
# manifest stem -> (config folder, config section)
MANIFEST_MODELS = {"dit_3b": ("seedvr2_3b", "dit"), "dit_7b": ("seedvr2_7b", "dit"), "vae": ("seedvr2_3b", "vae")}
# Where the reference data lives in this workplace: shared/reference/ beside the repository (seedvr/tools/ -> root).
SHARED_REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


@dataclass
class Result:
    file: str
    name: str
    max_abs: float | None
    max_rel: float | None
    passed: bool | None  # None: skipped
    note: str = ""
    psnr_db: float | None = None  # only for the bf16 pipeline check

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        errors = "" if self.max_abs is None else f"  max_abs {self.max_abs:.3e}  max_rel {self.max_rel:.3e}"
        psnr = "" if self.psnr_db is None else f"  psnr {self.psnr_db:.2f} dB"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.file:32s} {self.name:32s}{errors}{psnr}  {status}{note}"


def compare(file: str, name: str, ours: torch.Tensor, golden: torch.Tensor, atol: float) -> Result:
    """Max abs/rel error of `ours` against `golden`; a shape mismatch fails (size-1 dims aside)."""
    if ours.shape != golden.shape:
        if ours.squeeze().shape != golden.squeeze().shape:
            return Result(file, name, None, None, False, f"shape {tuple(ours.shape)} != golden {tuple(golden.shape)}")
        ours = ours.reshape(golden.shape)
    diff = (ours.double() - golden.double()).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / max(golden.double().abs().max().item(), 1e-30)
    if golden.dtype != torch.uint8:
        return Result(file, name, max_abs, max_rel, max_abs <= atol)
    off_fraction = (diff > 0).double().mean().item()
    passed = max_abs <= 1 and off_fraction <= UINT8_MAX_OFF_FRACTION
    return Result(file, name, max_abs, max_rel, passed, f"{off_fraction:.4%} of values off")


def psnr(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images; inf when they are equal."""
    mse = (ours.double() - golden.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(UINT8_PEAK**2 / mse)


def compare_psnr(file: str, ours: torch.Tensor, golden: torch.Tensor, min_db: float) -> Result:
    if ours.shape != golden.shape:
        return Result(file, "final_uint8", None, None, False, f"shape {tuple(ours.shape)} != golden {tuple(golden.shape)}")
    max_abs = (ours.double() - golden.double()).abs().max().item()
    db = psnr(ours, golden)
    return Result(file, "final_uint8", max_abs, max_abs / UINT8_PEAK, db >= min_db, f"at least {min_db:g} dB", db)


def tensors_by_role(meta: dict, file: str, role: str) -> list[str]:
    return [name for name, info in meta["files"][file]["tensors"].items() if info["role"] == role]


def build_dit(case: str, kwargs: dict, weights: Path) -> NaDiT3B | NaDiT7B:
    model = DIT_CLASSES[case](**kwargs).eval()
    return load_strict(model, read_state_dict(weights), weights)


def build_vae(kwargs: dict, weights: Path) -> VideoAutoencoder:
    return load_strict(VideoAutoencoder(**kwargs).eval(), read_state_dict(weights), weights)


def check_dit(case_dir: Path, meta: dict) -> list[Result]:
    """Every case file: forward the inputs, compare vid_sample (and vid_sample_bf16qkv when supported)."""
    model = build_dit(meta["case"], meta["config"]["kwargs"], case_dir / "weights.safetensors")
    results = []
    for file in meta["files"]:
        tensors = load_file(case_dir / file)
        inputs = {name: tensors[name] for name in tensors_by_role(meta, file, "input")}
        outputs = tensors_by_role(meta, file, "output")
        ours = model(**inputs)
        if meta["case"] == "dit3b_tiny" and inputs["vid_shape"].shape[0] > 1:
            results += check_packing_invariance(model, file, inputs, ours, tensors["vid_sample"])
        else:
            results.append(compare(file, "vid_sample", ours, tensors["vid_sample"], DIT_ATOL))
        if "vid_sample_bf16qkv" in outputs:
            results.append(check_bf16_qkv(model, file, inputs, tensors["vid_sample_bf16qkv"]))
    return results


def check_packing_invariance(model: torch.nn.Module, file: str, inputs: dict[str, torch.Tensor], ours: torch.Tensor,
                             golden: torch.Tensor) -> list[Result]:
    """3B batch golden: sample 0 against the golden; sample 1 against our own single-sample run.

    The official 3B lets samples b >= 1 read sample 0's rotated text (spec 4.9); we do not reproduce that.
    """
    first_rows = int(inputs["vid_shape"][0].prod())
    first_txt = int(inputs["txt_shape"][0, 0])
    alone = model(vid=inputs["vid"][first_rows:], txt=inputs["txt"][first_txt:], vid_shape=inputs["vid_shape"][1:],
                  txt_shape=inputs["txt_shape"][1:], timestep=inputs["timestep"][1:])
    return [
        compare(file, "vid_sample", ours[:first_rows], golden[:first_rows], DIT_ATOL),
        compare(file, "vid_sample_packing_invariance", ours[first_rows:], alone, DIT_ATOL),
    ]


def check_bf16_qkv(model: torch.nn.Module, file: str, inputs: dict[str, torch.Tensor], golden: torch.Tensor) -> Result:
    if not hasattr(model, BF16_QKV_FLAG):
        return Result(file, "vid_sample_bf16qkv", None, None, None, f"model has no {BF16_QKV_FLAG} flag")
    setattr(model, BF16_QKV_FLAG, True)
    try:
        ours = model(**inputs)
    finally:
        setattr(model, BF16_QKV_FLAG, False)
    if inputs["vid_shape"].shape[0] > 1 and isinstance(model, NaDiT3B):
        rows = int(inputs["vid_shape"][0].prod())  # only sample 0 is comparable (see check_packing_invariance)
        ours, golden = ours[:rows], golden[:rows]
    return compare(file, "vid_sample_bf16qkv", ours, golden, DIT_BF16_QKV_ATOL)


def check_vae(case_dir: Path, meta: dict) -> list[Result]:
    """Encode to the posterior, sample it with the recorded eps, scale; decode the scaled latent."""
    vae = build_vae(meta["config"]["kwargs"], case_dir / "weights.safetensors")
    runner = meta["config"]["runner_vae_config"]
    scale, shift = runner["scaling_factor"], runner["shifting_factor"]
    results = []
    for file in meta["files"]:
        golden = load_file(case_dir / file)
        mean, logvar = vae.encode(golden["video"][None])  # (1, 16, t, h, w)
        std = torch.exp(0.5 * logvar)
        latent = mean + std * golden["eps"]
        ours = {"posterior_mean": mean, "posterior_logvar": logvar, "posterior_std": std, "latent_sample": latent,
                "cond_latent": (latent[0].permute(1, 2, 3, 0) - shift) * scale}
        scaled = golden["cond_latent"] / scale + shift
        ours["decoded"] = vae.decode(scaled.permute(3, 0, 1, 2)[None])[0]
        results += [compare(file, name, ours[name], golden[name], VAE_ATOL) for name in ours if name in golden]
    return results


def check_pipeline(case_dir: Path, meta: dict, dtype: torch.dtype = torch.float32) -> list[Result]:
    """Every run end to end from its uint8 frames and seed; every stage the golden recorded is compared.

    dtype bfloat16: the models in the GPU's dtype policy, the golden's eps and noise injected, and only the
    PSNR of final_uint8 compared (see the module docstring)."""
    dit_weights = (case_dir / meta["models"]["dit"].split()[0]).resolve()
    vae_weights = (case_dir / meta["models"]["vae"].split()[0]).resolve()
    dit_meta = json.loads((dit_weights.parent / "meta.json").read_text())
    vae_meta = json.loads((vae_weights.parent / "meta.json").read_text())
    dit = build_dit(dit_meta["case"], dit_meta["config"]["kwargs"], dit_weights)
    vae = build_vae(vae_meta["config"]["kwargs"], vae_weights)
    if dtype != torch.float32:
        dit.to_compute_dtype(dtype)
        vae.to(dtype)
    runner = vae_meta["config"]["runner_vae_config"]
    text_file = next(file for file in meta["files"] if {"pos", "neg"} <= set(meta["files"][file]["tensors"]))
    text = load_file(case_dir / text_file)
    pipeline = SeedVR2(dit, vae, text["pos"], text["neg"], device="cpu", dtype=dtype,
                       scaling_factor=runner["scaling_factor"], shifting_factor=runner["shifting_factor"])
    results = []
    for run, settings in meta["runs"].items():
        file = f"{run}.safetensors"
        golden = load_file(case_dir / file)
        stages: dict[str, torch.Tensor] = {}
        sampling = Sampling(seed=settings["seed"], cfg_scale=settings["cfg_scale"],
                            cfg_rescale=settings["cfg_rescale"], sample_steps=settings["sample_steps"])
        bf16 = dtype != torch.float32  # then the golden's draws are injected
        restored = pipeline.restore(golden["frames_uint8"].permute(0, 2, 3, 1), res_h=settings["res_h"],
                                    res_w=settings["res_w"], sampling=sampling, stages=stages,
                                    eps=golden["eps_posterior"] if bf16 else None,
                                    noise=golden["noise"] if bf16 else None)
        if bf16:
            results.append(compare_psnr(file, restored, golden["final_uint8"], BF16_MIN_PSNR_DB))
            continue
        for name in golden:
            if name in stages:
                results.append(compare(file, name, stages[name], golden[name], PIPELINE_ATOL))
            elif meta["files"][file]["tensors"][name]["role"] != "input":
                results.append(Result(file, name, None, None, False, "not produced"))
    return results


def check_colorfix(case_dir: Path, meta: dict) -> list[Result]:
    """output{suffix} = wavelet colour fix of content{suffix} with style{suffix}."""
    results = []
    for file in meta["files"]:
        tensors = load_file(case_dir / file)
        for name in tensors_by_role(meta, file, "output"):
            suffix = name.removeprefix("output")
            ours = color_fix(tensors[f"content{suffix}"], tensors[f"style{suffix}"], "wavelet")
            results.append(compare(file, name, ours, tensors[name], COLORFIX_ATOL))
    return results


def check_preprocess(case_dir: Path, meta: dict) -> list[Result]:
    """{case}_out = the transform of the uint8 {case}_frames (T, 3, H, W) at the case's res_h x res_w."""
    results = []
    for file in meta["files"]:
        tensors = load_file(case_dir / file)
        for case, settings in meta["cases"].items():
            frames = tensors[f"{case}_frames"].permute(0, 2, 3, 1)  # (T, H, W, 3)
            ours = preprocess(frames, settings["res_h"], settings["res_w"])
            results.append(compare(file, f"{case}_out", ours, tensors[f"{case}_out"], PREPROCESS_ATOL))
    return results


CASE_CHECKS = {
    "dit3b_tiny": check_dit,
    "dit7b_tiny": check_dit,
    "vae_tiny": check_vae,
    "pipeline_tiny": check_pipeline,
    "colorfix": check_colorfix,
    "preprocess": check_preprocess,
}


def check_case(case_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[str, list[Result]]:
    meta = json.loads((case_dir / "meta.json").read_text())
    case = meta["case"]
    if case not in CASE_CHECKS:
        raise ValueError(f"{case_dir}: unknown case {case!r}; known: {', '.join(CASE_CHECKS)}")
    if dtype != torch.float32 and case != "pipeline_tiny":
        raise ValueError(f"{case_dir}: --dtype {dtype} runs pipeline cases only (this one is {case!r}); the other "
                         f"cases compare float32 tensors")
    with torch.inference_mode():
        if case == "pipeline_tiny":
            return case, check_pipeline(case_dir, meta, dtype)
        return case, CASE_CHECKS[case](case_dir, meta)


def build_full_size(stem: str) -> torch.nn.Module:
    """The full-size model a manifest describes, on the meta device (no memory, no init)."""
    model_type, section = MANIFEST_MODELS[stem]
    dit, vae = build_models(model_type, load_config(model_type))
    return vae if section == "vae" else dit


def key_group(key: str) -> str:
    """blocks.3.attn.proj_qkv.vid.weight -> blocks.3; vid_out_ada.out_scale -> vid_out_ada."""
    parts = key.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or key


def check_manifest(tsv: Path) -> tuple[str, list[Result]]:
    """One result per key group: PASS when every key of the group exists on both sides with equal shapes."""
    if tsv.stem not in MANIFEST_MODELS:
        raise ValueError(f"{tsv}: unknown manifest; known: {', '.join(f'{stem}.tsv' for stem in MANIFEST_MODELS)}")
    manifest = read_manifest(tsv)
    model = build_full_size(tsv.stem)
    keys_by_group: dict[str, set[str]] = {}
    for key in [*manifest, *model.state_dict()]:
        keys_by_group.setdefault(key_group(key), set()).add(key)
    mismatches_by_group: dict[str, list[str]] = {group: [] for group in keys_by_group}
    for mismatch in compare_with_manifest(model, manifest):
        mismatches_by_group[key_group(mismatch.key)].append(str(mismatch))
    results = [
        Result(tsv.name, group, None, None, not mismatches, "; ".join(mismatches) or f"{len(keys_by_group[group])} keys")
        for group, mismatches in mismatches_by_group.items()
    ]
    return f"manifest:{tsv.stem}", results


def target_problem(target: Path, reference: Path = SHARED_REFERENCE) -> str | None:
    """Why `target` cannot be checked (missing, or not a case directory / manifest), saying where the reference
    data lives and how to pass it; None when it can be."""
    if target.suffix == ".tsv" and target.is_file():
        return None
    if target.is_dir() and (target / "meta.json").is_file():
        return None
    if target.is_dir():
        found = f"{target} is a folder without meta.json, so not a golden case directory"
    else:
        found = f"{target} does not exist" + (f" (relative paths start from {Path.cwd()})" if not target.is_absolute()
                                              else "")
    if reference.is_dir():
        cases = sorted(meta.parent.name for meta in reference.glob("golden/*/meta.json"))
        manifests = sorted(tsv.name for tsv in reference.glob("manifests/*.tsv"))
        targets = [f"golden/{case}" for case in cases] + [f"manifests/{name}" for name in manifests]
        there = f"it is in {reference}, holding {', '.join(targets) or 'nothing to check'}"
    else:
        there = (f"it is not part of the repository: this workplace keeps it in shared/reference/ next to the "
                 f"checkout ({reference}), which this machine lacks; copy that folder from the workplace, here or "
                 f"anywhere")
    return (f"{found}. The parity reference data (golden tensors and manifests made by the official code): "
            f"{there}. Pass a case directory or a manifest from it, e.g. python -m seedvr.parity "
            f"{reference}/golden/pipeline_tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedvr.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="a golden case directory or a manifest .tsv")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="bfloat16: a pipeline case under the GPU's dtype policy, judged by the PSNR of final_uint8")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32 and args.target.suffix == ".tsv":
        parser.error("--dtype applies to pipeline golden cases, not to manifests")
    problem = target_problem(args.target)
    if problem:
        parser.error(problem)

    try:
        case, results = check_manifest(args.target) if args.target.suffix == ".tsv" else check_case(args.target, dtype)
    except CheckpointError as error:  # weights that do not fit the model: one failure, with the reason
        case, results = str(args.target), [Result(args.target.name, "weights", None, None, False, str(error))]
    except ValueError as error:  # an unknown case or manifest, or a wrong --dtype for the case: the message says
        parser.error(str(error))
    for result in results:
        print(result.line())
    passed = sum(result.passed is True for result in results)
    failed = sum(result.passed is False for result in results)
    skipped = sum(result.passed is None for result in results)
    if skipped:
        print(f"skipped: {skipped} (not counted)")
    print(f"parity: {passed} passed, {failed} failed")
    if args.json:
        entries = [{key: value for key, value in asdict(result).items()
                    if (key != "note" or value) and (key != "psnr_db" or value is not None)} for result in results]
        report = {"case": case, "results": entries, "passed": passed, "failed": failed, "skipped": skipped}
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
