"""The Dockerfile, .dockerignore and the RunPod Hub files, checked against the repository.

No Docker engine here: the checks read the files and run the parts that can run outside an image
(the pyproject readers, the CUDA index derivation), and send the Hub's test inputs through the
request schema.
"""

import base64
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from seedvr import settings
from seedvr.io.media.payload import sniff_media
from seedvr.serving import schema
from seedvr.tools import weights

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
HUB_CATEGORIES = ("audio", "embedding", "language", "video", "image")
HUB_GPU_POOLS = ("AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile: continuation lines joined, comment lines dropped."""
    result, pending = [], ""
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + (" " if line.rstrip().endswith("\\") else "")
        if not line.rstrip().endswith("\\"):
            instruction, _, arguments = pending.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
            pending = ""
    return result


def arg_default(name: str) -> str:
    return next(args.split("=", 1)[1].strip('"') for instruction, args in instructions()
                if instruction == "ARG" and args.startswith(name + "="))


def run_text() -> str:
    return "\n".join(args for instruction, args in instructions() if instruction == "RUN")


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parents = ["/".join(path.split("/")[:depth]) for depth in range(1, path.count("/") + 2)]
    decision = False
    for pattern in dockerignore_patterns():
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(parent, alternative) for parent in parents for alternative in alternatives):
            decision = not negated
    return decision


def copied_sources() -> list[str]:
    sources = []
    for instruction, args in instructions():
        if instruction == "COPY" and not args.startswith("--from="):
            sources += shlex.split(args)[:-1]
    return sources


def test_every_copy_source_exists_and_reaches_the_build_context():
    sources = copied_sources()
    assert {"pyproject.toml", "seedvr", "handler.py", "configs_3b", "configs_7b"} <= set(sources)
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [file for file in path.rglob("*") if file.suffix in (".py", ".yaml")]
        for file in files:
            relative = file.relative_to(REPO_ROOT).as_posix()
            assert not ignored(relative), f"COPY {source}: .dockerignore leaves {relative} out of the build context"


def test_dockerignore_keeps_weights_and_history_out():
    for path in ("ckpts/seedvr2_ema_7b.pth", "ckpts/ema_vae.safetensors", "embeddings/pos_emb.pt", ".git/HEAD",
                 "seedvr/__pycache__/weights.cpython-312.pyc", "tests/test_weights.py"):
        assert ignored(path), path
    for path in ("ckpts/README.md", "embeddings/README.md", "seedvr/weights.py", "handler.py"):
        assert not ignored(path), path


def test_the_command_runs_the_copied_handler():
    commands = [json.loads(args) for instruction, args in instructions() if instruction == "CMD"]
    assert commands[-1] == ["python", "-u", "handler.py"]
    assert (REPO_ROOT / "handler.py").is_file() and "handler.py" in copied_sources()
    assert "runpod.serverless.start" in (REPO_ROOT / "handler.py").read_text()


def test_apt_installs_libmagic_and_a_python_with_venv():
    packages = set()
    for command in re.findall(r"apt-get install ([^&]+)", run_text()):
        packages |= {word for word in command.split() if not word.startswith("-")}
    assert {"libmagic1", "python3", "python3-venv", "ca-certificates"} <= packages


@pytest.mark.parametrize("table, expected", [(["dependencies"], PYPROJECT["dependencies"]),
                                             (["optional-dependencies", "flash"],
                                              PYPROJECT["optional-dependencies"]["flash"])])
def test_the_requirement_files_are_read_from_pyproject(table, expected):
    readers = re.findall(r"python -c '([^']+)'\s+([\w\- ]+?)\s*>", run_text())
    reader = next(code for code, args in readers if args.split() == table)
    printed = subprocess.run([sys.executable, "-c", reader, *table], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == expected


def test_torch_is_pinned_by_pyproject_and_comes_from_the_cuda_index_of_the_base_image():
    text = run_text()
    assert "pip install \"$(grep '^torch==' /opt/requirements.txt)\"" in text
    assert any(re.fullmatch(r"torch==[\w.]+", requirement) for requirement in PYPROJECT["dependencies"])
    derivation = re.search(r'--index-url "https://download\.pytorch\.org/whl/cu\$\((.+?)\)"', text).group(1)
    cuda = arg_default("CUDA_VERSION")
    index = subprocess.run(["bash", "-c", derivation], env={"CUDA_VERSION": cuda, "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert index == "".join(cuda.split(".")[:2])  # 12.8.1 -> 128
    assert all("nvidia/cuda:${CUDA_VERSION}-" in args for instruction, args in instructions() if instruction == "FROM"
               and args.startswith("nvidia/"))


def test_version_literals_in_the_dockerfile_agree_with_pyproject():
    pins = dict(requirement.split("==") for requirement in PYPROJECT["dependencies"]
                + sum(PYPROJECT["optional-dependencies"].values(), []))
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for name, version in re.findall(r"([A-Za-z][\w.\-]*)==([\w.]+)", dockerfile):
        assert pins.get(name) == version, f"Dockerfile pins {name}=={version}, pyproject.toml {pins.get(name)}"


def test_baked_weights_win_over_a_network_volume_and_use_the_weights_cli():
    envs = " ".join(args for instruction, args in instructions() if instruction == "ENV")
    assert "SEEDVR_CKPT_DIR=${BAKE_MODEL:+/app/ckpts}" in envs
    assert "SEEDVR_EMBEDDINGS_DIR=${BAKE_MODEL:+/app/embeddings}" in envs
    text = run_text()
    assert 'python -m seedvr.weights download --model "$model"' in text
    assert 'python -m seedvr.weights convert --model "$model" --delete-pth' in text
    with pytest.raises(SystemExit):  # the CLI refuses what it does not know, so the flags above are real ones
        weights.main(["convert", "--model", "seedvr2_3b", "--no-such-flag"])


def hub() -> dict:
    return json.loads((REPO_ROOT / ".runpod" / "hub.json").read_text())


def hub_tests() -> dict:
    return json.loads((REPO_ROOT / ".runpod" / "tests.json").read_text())


def worker_source() -> str:
    return "\n".join(path.read_text() for path in [REPO_ROOT / "handler.py", *(REPO_ROOT / "seedvr").rglob("*.py")])


def test_hub_json_has_the_fields_the_hub_requires():
    listing = hub()
    assert listing["title"] and listing["description"] and listing["type"] == "serverless"
    assert listing["category"] in HUB_CATEGORIES
    config = listing["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["containerDiskInGb"] >= 50
    assert set(config["gpuIds"].split(",")) <= set(HUB_GPU_POOLS)
    for action in schema.ACTIONS:
        assert action in listing["description"]


def test_hub_cuda_versions_are_those_the_base_image_runs_on():
    base = tuple(int(part) for part in arg_default("CUDA_VERSION").split(".")[:2])
    for config in (hub()["config"], hub_tests()["config"]):
        versions = [tuple(int(part) for part in version.split(".")) for version in config["allowedCudaVersions"]]
        assert versions and all(version >= base for version in versions)  # nvidia/cuda images require cuda>=base


def test_hub_env_variables_are_read_by_the_worker_with_the_advertised_defaults(monkeypatch):
    env = {entry["key"]: entry["input"] for entry in hub()["config"]["env"]}
    source = worker_source()
    for key, spec in env.items():
        assert spec["name"] and spec["description"] and spec["type"] in ("string", "number", "boolean")
        assert f'"{key}"' in source or key == "HF_TOKEN", f"{key} is not read by the worker"
    assert set(env) - {"HF_TOKEN"} <= set(settings.VARIABLES)
    assert env["SEEDVR_MAX_OUTPUT_AREA"]["default"] == settings.DEFAULT_MAX_OUTPUT_AREA
    assert env["SEEDVR_BASE64_LIMIT_BYTES"]["default"] == settings.DEFAULT_BASE64_LIMIT_BYTES
    assert env["SEEDVR_MAX_DOWNLOAD_BYTES"]["default"] == settings.DEFAULT_MAX_DOWNLOAD_BYTES
    auto = env["SEEDVR_AUTO_DOWNLOAD"]
    monkeypatch.setenv("SEEDVR_AUTO_DOWNLOAD", str(auto["trueValue"]).lower())
    assert settings.current().auto_download
    monkeypatch.setenv("SEEDVR_AUTO_DOWNLOAD", str(auto["falseValue"]).lower())
    assert not settings.current().auto_download
    for preset in hub()["config"]["presets"]:
        assert set(preset["defaults"]) <= set(env)


def test_hub_tests_are_valid_requests_covering_every_action():
    suite = hub_tests()
    assert {entry["key"] for entry in suite["config"]["env"]} <= {entry["key"] for entry in hub()["config"]["env"]}
    assert suite["config"]["gpuCount"] == 1 and suite["config"]["gpuTypeId"].startswith("NVIDIA ")
    actions = set()
    for test in suite["tests"]:
        assert test["name"] and isinstance(test["timeout"], int) and test["timeout"] > 0
        job_input = test["input"]
        fields = {field.name for field in schema.TABLE[job_input["action"]]}
        assert set(job_input) <= fields, test["name"]
        request = schema.parse_request(job_input)
        actions.add(request.action)
        if job_input.get("media"):
            kind = sniff_media(base64.b64decode(job_input["media"])).kind
            assert kind == job_input.get("media_type", kind) and kind in ("image", "video"), test["name"]
    assert actions == set(schema.ACTIONS)
