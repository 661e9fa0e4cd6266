"""The handler in-process: routing, error shapes, the model holder under concurrent jobs."""

import base64
import gc
import json
import os
import subprocess
import sys
import threading
import weakref

import pytest
from conftest import S3_BUCKET
from media_factory import make_image
from worker_server import REPO_ROOT, tiny_paths

import handler


@pytest.fixture
def tiny_env(tiny_dir, monkeypatch):
    for name, value in tiny_paths(tiny_dir).items():
        monkeypatch.setenv(name, value)
    return tiny_dir


def run(job_input) -> dict:
    return handler.serve({"id": "test-job", "input": job_input})


@pytest.mark.parametrize("job_input", [None, "health", ["restore"], 5])
def test_input_that_is_not_an_object(job_input):
    assert run(job_input)["error"].startswith("INVALID_INPUT: input must be a JSON object")


def test_unknown_action_lists_the_valid_ones():
    error = run({"action": "upscale"})["error"]
    assert error.startswith("INVALID_INPUT: action") and all(name in error for name in handler.ACTIONS)


def test_missing_weights_name_the_files_and_the_download_command(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(tmp_path))
    error = run({"action": "initialize", "model_type": "seedvr2_7b", "model_variant": "sharp"})["error"]
    assert error.startswith("MODEL_NOT_AVAILABLE: ")
    assert str(tmp_path / "seedvr2_ema_7b_sharp.pth") in error and str(tmp_path / "ema_vae.pth") in error
    assert "python -m seedvr.weights download --model seedvr2_7b_sharp" in error
    assert "pos_emb.pt" not in error  # the embeddings are present


def test_a_checkpoint_that_does_not_fit_names_file_and_key(tiny_env, tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for name in ("seedvr2_ema_3b.pth", "ema_vae.pth"):
        (ckpts / name).write_bytes((tiny_env / "ckpts" / name).read_bytes())
    (ckpts / "seedvr2_ema_3b.pth").write_bytes((tiny_env / "ckpts" / "seedvr2_ema_7b.pth").read_bytes())
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(ckpts))
    handler.HOLDER.release()
    error = run({"action": "initialize", "model_type": "seedvr2_3b"})["error"]
    assert error.startswith("MODEL_NOT_AVAILABLE: ") and "seedvr2_ema_3b.pth" in error
    assert "blocks." in error  # names a key


def test_unexpected_errors_are_internal_and_leak_nothing(monkeypatch):
    def broken(request, job):
        raise RuntimeError("secret path /etc/shadow")

    monkeypatch.setitem(handler.ACTIONS, "health", broken)
    error = run({"action": "health"})["error"]
    assert error.startswith("INTERNAL: ") and "secret" not in error and "Traceback" not in error
    assert "test-job" in error  # points at the log


def test_concurrent_jobs_for_two_models_are_serialised(tiny_env, tmp_path):
    path, _, _ = make_image(tmp_path, "jpeg")
    media = base64.b64encode(path.read_bytes()).decode()
    answers = {}

    def job(model_type):
        answers[model_type] = run({"action": "restore", "media": media, "res_h": 64, "res_w": 96,
                                   "model_type": model_type})

    threads = [threading.Thread(target=job, args=(model,)) for model in ("seedvr2_3b", "seedvr2_7b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {model: answer.get("model_type") for model, answer in answers.items()} == \
        {"seedvr2_3b": "seedvr2_3b", "seedvr2_7b": "seedvr2_7b"}
    assert all(answer["success"] for answer in answers.values())


def test_switching_models_frees_the_old_one(tiny_env):
    assert "error" not in run({"action": "initialize", "model_type": "seedvr2_3b"})
    old_dit = weakref.ref(handler.HOLDER.current.restorer.dit)
    assert "error" not in run({"action": "initialize", "model_type": "seedvr2_7b"})
    gc.collect()
    assert old_dit() is None
    assert handler.HOLDER.describe()["model_type"] == "seedvr2_7b"


@pytest.mark.slow
def test_runpod_debug_turns_on_verbose_logging():
    probe = "import logging, handler; print(logging.getLogger().getEffectiveLevel())"
    levels = {}
    for value in ("1", "0"):
        env = {"RUNPOD_DEBUG": value, "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        levels[value] = int(out.stdout.strip().splitlines()[-1])
    assert levels == {"1": 10, "0": 20}


@pytest.mark.slow
def test_every_log_line_of_a_job_names_the_job(tiny_dir, tmp_path, s3_endpoint):
    """Model loading, the plan and the upload all log under the job's id (runpod's test job is `local_test`)."""
    path, _, _ = make_image(tmp_path, "jpeg")
    job = {"input": {"action": "restore", "media": base64.b64encode(path.read_bytes()).decode(), "res_h": 64,
                     "res_w": 96, "output_delivery": "url"}}
    env = {**os.environ, **tiny_paths(tiny_dir), "BUCKET_ENDPOINT_URL": f"{s3_endpoint}/{S3_BUCKET}",
           "BUCKET_ACCESS_KEY_ID": "x", "BUCKET_SECRET_ACCESS_KEY": "x"}
    result = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = [line for line in result.stderr.splitlines() if " seedvr." in line]
    assert any("loading seedvr2_3b" in line for line in ours) and any("uploaded" in line for line in ours), ours
    assert all("job=local_test:" in line for line in ours), ours


def test_the_worker_sets_expandable_segments_unless_the_user_chose():
    probe = "import os, handler; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    chosen = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**base, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    default = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, env=base)
    assert chosen.stdout.split()[-1] == "max_split_size_mb:512"
    assert default.stdout.split()[-1] == "expandable_segments:True"


# what runpod.serverless.start does with these arguments and variables: (argv, environment, runs one test job)
START_MODES = [
    ([], {}, True),  # `python handler.py`: test_input.json
    (["--test_input", '{"input": {}}'], {}, True),
    (["--rp_serve_api", "--rp_api_port", "8000"], {}, False),  # the local API server
    ([], {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}, False),  # production
    (["--test_input", '{"input": {}}'], {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}, True),
    ([], {"RUNPOD_REALTIME_PORT": "8000"}, False),  # RunPod's realtime server
    (["--rp_log_level", "INFO"], {}, True),
]


@pytest.mark.parametrize("argv, environ, one_job", START_MODES,
                         ids=["test_input_json", "test_input_flag", "serve_api", "production", "production_test_input",
                              "realtime", "other_flags"])
def test_only_the_local_test_job_writes_files(argv, environ, one_job):
    """Production, the local API and realtime keep the plain handler; the local test run gets the file writer."""
    assert handler.runs_one_test_job(argv, environ) is one_job


def test_a_local_test_answer_names_files_in_place_of_base64(tiny_env, tmp_path):
    """An image with its before/after picture, answered as data URIs: each is written to outputs/<job>/, byte for
    byte, and the answer names the files; the rest of the answer stays. (A video: test_readme's handler run.)"""
    image, _, _ = make_image(tmp_path, "jpeg")
    answer = run({"action": "restore", "media": base64.b64encode(image.read_bytes()).decode(), "res_h": 64,
                  "res_w": 96, "compare": True, "format": "webp", "return_data_uri": True})
    assert answer.get("success"), answer
    folder = tmp_path / "outputs" / "job"
    written = handler.write_results(answer, folder)
    names = {"media": "restored0.webp", "compare": "compare0.png"}
    for key, name in names.items():
        assert written[key] == [str((folder / name).resolve())]
        assert (folder / name).read_bytes() == base64.b64decode(answer[key][0].split(",", 1)[1])
    assert {key: value for key, value in written.items() if key not in names} == {
        key: value for key, value in answer.items() if key not in names}
    delivered_as_url = {**answer, "media": [None], "compare": [None], "media_urls": ["https://example.com/a"]}
    assert handler.write_results(delivered_as_url, tmp_path / "none") == delivered_as_url
    assert handler.write_results({"status": "healthy"}, tmp_path / "none") == {"status": "healthy"}
    assert not (tmp_path / "none").exists()
