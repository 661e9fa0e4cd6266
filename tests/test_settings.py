"""Settings are read and checked once, at start: a bad value stops the worker in every mode, naming the
variable; health shows the effective settings and never a secret."""

import json
import os
import subprocess
import sys

import pytest
import runpod.serverless.modules.rp_fitness as rp_fitness
from worker_server import REPO_ROOT, free_port, tiny_paths

from seedvr import settings
from seedvr.serving import fitness

BAD_VALUES = [  # (variable, value, what the message must say)
    ("SEEDVR_MAX_OUTPUT_AREA", "lots", "SEEDVR_MAX_OUTPUT_AREA must be an integer >= 256, got 'lots'"),
    ("SEEDVR_MAX_OUTPUT_AREA", "100", "SEEDVR_MAX_OUTPUT_AREA must be an integer >= 256, got '100'"),
    ("SEEDVR_MAX_CHUNK_FRAMES", "44", "SEEDVR_MAX_CHUNK_FRAMES must be 4n+1 and at least 5, got 44"),
    ("SEEDVR_BASE64_LIMIT_BYTES", "-1", "SEEDVR_BASE64_LIMIT_BYTES must be a non-negative integer"),
    ("SEEDVR_MAX_DOWNLOAD_BYTES", "0", "SEEDVR_MAX_DOWNLOAD_BYTES must be a positive integer"),
    ("SEEDVR_DOWNLOAD_TIMEOUT_S", "nan", "SEEDVR_DOWNLOAD_TIMEOUT_S must be a positive number"),
    ("SEEDVR_AUTO_DOWNLOAD", "maybe", "SEEDVR_AUTO_DOWNLOAD must be 1/true/yes/on or 0/false/no/off"),
    ("SEEDVR_ALLOW_PRIVATE_URLS", "2", "SEEDVR_ALLOW_PRIVATE_URLS must be 1/true/yes/on"),
    ("SEEDVR_DISABLE_NVENC", "nvenc", "SEEDVR_DISABLE_NVENC must be 1/true/yes/on"),
    ("SEEDVR_TEST_MEMORY_SCALE", "-2", "SEEDVR_TEST_MEMORY_SCALE must be a positive number"),
    ("SEEDVR_SP_STALL_S", "0", "SEEDVR_SP_STALL_S must be a positive number"),
    ("BUCKET_ENDPOINT_URL", "s3.example.com", "missing: BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY"),
]


def clean_environment(**values: str) -> dict[str, str]:
    base = {name: value for name, value in os.environ.items()
            if name not in settings.VARIABLES and not name.startswith("RUNPOD_")}
    return {**base, **values}


@pytest.mark.parametrize("variable, value, message", BAD_VALUES, ids=[f"{v}={x}" for v, x, _ in BAD_VALUES])
def test_a_bad_value_names_the_variable_and_what_it_accepts(variable, value, message):
    with pytest.raises(settings.SettingsError) as caught:
        settings.read({variable: value})
    assert message in str(caught.value)


def test_defaults_and_good_values_are_read():
    default = settings.read({})
    assert (default.max_output_area, default.max_chunk_frames, default.base64_limit_bytes) == (3840 * 2160, 121,
                                                                                               15_000_000)
    assert default.bucket is None and not default.auto_download
    chosen = settings.read({"SEEDVR_MAX_OUTPUT_AREA": "10000", "SEEDVR_AUTO_DOWNLOAD": "true",
                            "SEEDVR_MAX_CHUNK_FRAMES": "45", "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9/bucket",
                            "BUCKET_ACCESS_KEY_ID": "id", "BUCKET_SECRET_ACCESS_KEY": "very-secret"})
    assert (chosen.max_output_area, chosen.auto_download, chosen.max_chunk_frames) == (10000, True, 45)
    assert "very-secret" not in repr(chosen) and "very-secret" not in json.dumps(chosen.public())


def test_current_follows_a_changed_environment(monkeypatch):
    monkeypatch.setenv("SEEDVR_MAX_OUTPUT_AREA", "10000")
    assert settings.current().max_output_area == 10000
    monkeypatch.setenv("SEEDVR_MAX_OUTPUT_AREA", "20000")
    assert settings.current().max_output_area == 20000


def test_unknown_seedvr_variables_are_named_with_a_suggestion():
    assert settings.unknown_variables({"SEEDVR_MAX_OUTPUT_ARA": "1", "SEEDVR_REFERENCE_DIR": "x", "HOME": "/"}) == [
        "SEEDVR_MAX_OUTPUT_ARA (did you mean SEEDVR_MAX_OUTPUT_AREA?)"]


def start_worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "handler.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


MODES = {
    "test_input": (),
    "local_api": ("--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", "0"),
    "production": (),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_bad_setting_stops_the_worker_at_start_in_every_mode(tiny_dir, mode):
    env = clean_environment(**tiny_paths(tiny_dir), SEEDVR_MAX_OUTPUT_AREA="4k")
    args = MODES[mode]
    if mode == "local_api":
        args = (*args[:-1], str(free_port()))
    if mode == "production":  # what RunPod sets: the worker would poll this URL for jobs
        env |= {"RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/$ID", "RUNPOD_POD_ID": "pod",
                "RUNPOD_WEBHOOK_PING": "http://127.0.0.1:9/ping"}
    result = start_worker(env, *args)
    assert result.returncode == 1
    assert "the worker cannot start: SEEDVR_MAX_OUTPUT_AREA must be an integer >= 256, got '4k'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_missing_weights_folder_stops_the_worker_and_a_good_setup_starts(tiny_dir, tmp_path):
    env = clean_environment(**(tiny_paths(tiny_dir) | {"SEEDVR_CKPT_DIR": str(tmp_path / "nowhere")}))
    result = start_worker(env)
    assert result.returncode == 1 and f"SEEDVR_CKPT_DIR names {tmp_path / 'nowhere'}, which is not a folder" in \
        result.stderr
    good = start_worker(clean_environment(**tiny_paths(tiny_dir)), "--test_input", '{"input": {"action": "health"}}')
    assert good.returncode == 0, good.stderr[-2000:]
    assert '"status": "healthy"' in good.stdout or "'status': 'healthy'" in good.stdout + good.stderr


def test_fitness_checks_pass_here_and_fail_with_a_reason(monkeypatch):
    assert fitness.problems() == []
    monkeypatch.setenv("SEEDVR_MAX_CHUNK_FRAMES", "7")
    assert fitness.problems() == ["SEEDVR_MAX_CHUNK_FRAMES must be 4n+1 and at least 5, got 7"]


def test_the_checks_are_registered_with_runpod(monkeypatch):
    import handler

    rp_fitness.clear_fitness_checks()
    try:
        handler.prepare()
        assert [check.__name__ for check in rp_fitness._fitness_checks] == [check.__name__ for check in fitness.CHECKS]
    finally:
        rp_fitness.clear_fitness_checks()


def test_health_shows_the_effective_settings_and_no_secret(tiny_handler, monkeypatch):
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9/results")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "key-id-123")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "secret-456")
    monkeypatch.setenv("SEEDVR_MAX_OUTPUT_AREA", "40000")
    answer = tiny_handler({"id": "h", "input": {"action": "health"}})
    assert answer["settings"]["max_output_area"] == 40000
    assert answer["settings"]["bucket_endpoint_url"] == "http://127.0.0.1:9/results"
    text = json.dumps(answer)
    assert "key-id-123" not in text and "secret-456" not in text
