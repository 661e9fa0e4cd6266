"""Output delivery against a real S3-compatible server (moto) on loopback."""

import base64
import os
import socket
import time
from pathlib import Path

import boto3
import pytest
import requests
from conftest import S3_BUCKET as BUCKET

from seedvr import settings
from seedvr.errors import INTERNAL, INVALID_INPUT, OUTPUT_TOO_LARGE, RestoreError
from seedvr.io.delivery import DeliverySpec, InlineBudget, deliver, inline_risk

CREDENTIALS = {"BUCKET_ACCESS_KEY_ID": "test-key", "BUCKET_SECRET_ACCESS_KEY": "test-secret"}


@pytest.fixture
def bucket_env(monkeypatch, s3_endpoint):
    """The RunPod bucket variables, the endpoint naming the bucket in its path (as for MinIO)."""
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"{s3_endpoint}/{BUCKET}")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


@pytest.fixture
def no_bucket_env(monkeypatch):
    for name in settings.BUCKET_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "media" / "restored.mp4"
    path.parent.mkdir()
    path.write_bytes(os.urandom(50_000) + bytes(range(256)))
    return path


def stored_keys(endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def test_url_delivery_uploads_and_the_url_downloads_the_same_bytes(bucket_env, video):
    before = set(stored_keys(bucket_env))
    delivered = deliver(video, mode="url", job_id="job-123", mime="video/mp4")

    assert delivered.kind == "url" and delivered.size_bytes == video.stat().st_size
    response = requests.get(delivered.value, timeout=10)
    assert response.status_code == 200
    assert response.content == video.read_bytes()
    assert response.headers["Content-Type"] == "video/mp4"

    (new_key,) = set(stored_keys(bucket_env)) - before
    assert "job-123/" in new_key and new_key.endswith(".mp4")
    assert new_key == delivered.value.split(f"/{BUCKET}/", 1)[1].split("?", 1)[0]


def test_object_keys_are_unique_per_upload_and_job_ids_are_sanitised(bucket_env, video):
    first = deliver(video, mode="url", job_id="a/b c", mime="video/mp4").value
    second = deliver(video, mode="url", job_id="a/b c", mime="video/mp4").value
    assert first != second
    assert "/a_b_c/" in first and "/a_b_c/" in second


def test_base64_and_data_uri_decode_to_the_file_bytes(no_bucket_env, video):
    plain = deliver(video, mode="base64", job_id="j", mime="video/mp4")
    uri = deliver(video, mode="base64", job_id="j", mime="video/mp4", return_data_uri=True)

    assert plain.kind == uri.kind == "base64"
    assert base64.b64decode(plain.value, validate=True) == video.read_bytes()
    header, payload = uri.value.split(",", 1)
    assert header == "data:video/mp4;base64"
    assert base64.b64decode(payload, validate=True) == video.read_bytes()
    assert plain.size_bytes == uri.size_bytes == video.stat().st_size


def test_auto_inlines_below_the_limit_and_uploads_above(bucket_env, video, monkeypatch):
    encoded = len(base64.b64encode(video.read_bytes()))
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(encoded + 1))
    small = deliver(video, mode="auto", job_id="j", mime="video/mp4")
    assert small.kind == "base64" and len(small.value) == encoded

    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(encoded))
    large = deliver(video, mode="auto", job_id="j", mime="video/mp4")
    assert large.kind == "url"
    assert requests.get(large.value, timeout=10).content == video.read_bytes()


def test_auto_counts_the_data_uri_prefix(bucket_env, video, monkeypatch):
    encoded = len(base64.b64encode(video.read_bytes()))
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(encoded + 1))
    assert deliver(video, mode="auto", job_id="j", mime="video/mp4", return_data_uri=True).kind == "url"


def test_auto_defaults_to_inline_for_small_files_without_a_bucket(no_bucket_env, video, monkeypatch):
    monkeypatch.delenv("SEEDVR_BASE64_LIMIT_BYTES", raising=False)
    assert deliver(video, mode="auto", job_id="j", mime="video/mp4").kind == "base64"


@pytest.mark.parametrize("mode", ["url", "auto"])
def test_no_bucket_is_a_clear_error_and_nothing_is_written_locally(no_bucket_env, video, tmp_path, monkeypatch,
                                                                   mode):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", "10")
    assert settings.current().bucket is None

    with pytest.raises(RestoreError) as caught:
        deliver(video, mode=mode, job_id="j", mime="video/mp4")

    # "url" cannot be served without a bucket; "auto" could, had the result been small enough
    assert caught.value.code == {"url": INVALID_INPUT, "auto": OUTPUT_TOO_LARGE}[mode]
    for name in settings.BUCKET_VARIABLES:
        assert name in caught.value.message
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in video.parent.iterdir()) == ["restored.mp4"]


def test_a_bucket_needs_all_three_variables_and_names_the_missing_one(bucket_env, monkeypatch):
    assert settings.current().bucket is not None
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "")
    with pytest.raises(settings.SettingsError) as caught:
        settings.current()
    assert "missing: BUCKET_SECRET_ACCESS_KEY" in str(caught.value)
    assert CREDENTIALS["BUCKET_ACCESS_KEY_ID"] not in str(caught.value)


def test_unknown_mode_is_invalid_input(no_bucket_env, video):
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="email", job_id="j", mime="video/mp4")
    assert caught.value.code == INVALID_INPUT


def test_missing_bucket_on_the_server_is_an_internal_error(bucket_env, video, monkeypatch):
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"{bucket_env}/no-such-bucket")
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="url", job_id="j", mime="video/mp4")
    assert caught.value.code == INTERNAL
    assert "NoSuchBucket" in caught.value.message


def test_unreachable_endpoint_fails_fast_with_an_internal_error(bucket_env, video, monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}/{BUCKET}")

    started = time.monotonic()
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="url", job_id="j", mime="video/mp4")
    assert time.monotonic() - started < 10
    assert caught.value.code == INTERNAL
    assert "test-secret" not in str(caught.value)


def test_an_endpoint_that_never_answers_the_connect_times_out(bucket_env, video, monkeypatch):
    """A listener with a full backlog drops SYNs like a black-holed host; the connect timeout must cut it."""
    monkeypatch.setattr("seedvr.io.delivery.CONNECT_TIMEOUT_S", 0.3)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                pytest.skip("this platform accepts connections beyond the listen backlog")
            except TimeoutError:
                pass
            monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"http://127.0.0.1:{port}/{BUCKET}")
            started = time.monotonic()
            with pytest.raises(RestoreError) as caught:
                deliver(video, mode="url", job_id="j", mime="video/mp4")
            assert time.monotonic() - started < 10
        finally:
            for filler in fillers:
                filler.close()
    assert caught.value.code == INTERNAL
    assert "ConnectTimeout" in caught.value.message


def base64_length(path: Path) -> int:
    return len(base64.b64encode(path.read_bytes()))


def test_the_limit_is_in_bytes_of_base64_and_the_error_quotes_that_unit(no_bucket_env, video, monkeypatch):
    """The regression: a file under the limit whose base64 is over it was refused quoting the file's size."""
    size, encoded = video.stat().st_size, base64_length(video)
    limit = (size + encoded) // 2  # the file is below it, its base64 above
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(limit))

    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="auto", job_id="j", mime="video/mp4", what="the restored video of media")

    message = caught.value.message
    assert caught.value.code == OUTPUT_TOO_LARGE
    assert message.startswith(f"the restored video of media is {encoded} bytes of base64 (a {size}-byte file)")
    assert f"below {limit} bytes of base64 (SEEDVR_BASE64_LIMIT_BYTES)" in message
    assert 'output_delivery "auto" or "url"' in message and "smaller" in message

    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(encoded + 1))
    assert deliver(video, mode="auto", job_id="j", mime="video/mp4").kind == "base64"


def test_results_of_one_answer_share_the_limit(bucket_env, video, monkeypatch):
    encoded = base64_length(video)
    budget = InlineBudget(limit=encoded + encoded // 2)  # one result fits, two do not
    first = deliver(video, mode="auto", job_id="j", mime="video/mp4", budget=budget)
    second = deliver(video, mode="auto", job_id="j", mime="video/mp4", budget=budget)
    assert (first.kind, second.kind) == ("base64", "url")
    assert budget.used == encoded

    for name in settings.BUCKET_VARIABLES:
        monkeypatch.delenv(name)
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="auto", job_id="j", mime="video/mp4", budget=budget)
    assert caught.value.code == OUTPUT_TOO_LARGE
    assert f"on top of {encoded} bytes already inline for earlier results" in caught.value.message


def test_a_text_the_answer_repeats_counts_each_time(no_bucket_env, video):
    encoded = base64_length(video)
    budget = InlineBudget(limit=encoded + encoded // 2)
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="auto", job_id="j", mime="video/mp4", budget=budget, copies=2)
    assert caught.value.code == OUTPUT_TOO_LARGE
    assert f"is {2 * encoded} bytes of base64" in caught.value.message and "`videos`" in caught.value.message
    assert budget.used == 0


def test_base64_delivery_refuses_what_the_answer_cannot_carry_and_uploads_nothing(bucket_env, video, monkeypatch):
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(base64_length(video)))
    before = stored_keys(bucket_env)
    with pytest.raises(RestoreError) as caught:
        deliver(video, mode="base64", job_id="j", mime="video/mp4")
    assert caught.value.code == OUTPUT_TOO_LARGE
    assert "instead of 'base64'" in caught.value.message  # the bucket is there: ask for a URL
    assert stored_keys(bucket_env) == before


@pytest.mark.parametrize("mode,bucket,warned", [
    ("auto", False, True),  # no bucket: everything must be inline
    ("base64", True, True),  # inline asked for
    ("auto", True, False),  # what does not fit goes to the bucket
    ("url", True, False),  # nothing inline
], ids=["auto-no-bucket", "base64-with-bucket", "auto-with-bucket", "url"])
def test_inline_risk_warns_only_where_results_must_be_inline(mode, bucket, warned):
    target = settings.Bucket("http://127.0.0.1:9/b", "k", "s") if bucket else None
    budget = InlineBudget(limit=1000)
    spec = DeliverySpec(mode)
    assert inline_risk(999, spec, budget, target, "smaller") is None  # may fit
    warning = inline_risk(1000, spec, budget, target, "a higher crf")
    assert (warning is not None) == warned
    if warned:
        assert "at least 1000 bytes of base64" in warning and "below 1000 bytes of base64" in warning
        assert "OUTPUT_TOO_LARGE" in warning and "(a higher crf)" in warning


def test_inline_results_stay_out_of_the_sdks_debug_lines_but_not_out_of_the_json(tmp_path):
    """runpod's rp_job.run_job formats the whole answer into two debug f-strings, even with debug off: a base64
    result must not be copied (or logged) there, yet serialise whole."""
    import json

    from seedvr.io.media.payload import encode_file_base64

    path = tmp_path / "result.bin"
    path.write_bytes(os.urandom(30_000))
    text = encode_file_base64(path, "video/mp4")
    answer = {"media": [text], "videos": [text]}
    line = f"Handler output: {answer}"
    assert len(line) < 200 and "base64" in line and text[40:80] not in line
    assert json.loads(json.dumps(answer))["media"][0] == text == "data:video/mp4;base64," + base64.b64encode(
        path.read_bytes()).decode()
