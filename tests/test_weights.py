"""Weights tooling: download against a real local HTTP server that impersonates the Hugging Face hub, verify, convert.

huggingface_hub reads its environment (HF_ENDPOINT, HF_HUB_OFFLINE) at import, so downloads run
`python -m seedvr.weights` as a subprocess with that environment, as a user would. The server answers
the requests huggingface_hub 2.4 makes: HEAD /{repo}/resolve/main/{file} answers a small file itself
(200, git blob sha1 as ETag, X-Repo-Commit) and redirects a checkpoint to a CDN on another host name
(302 with X-Linked-Etag = sha256 and X-Linked-Size), like the hub's LFS files; GETs honour Range.
"""

import functools
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
from safetensors import safe_open
from safetensors.torch import load_file

from seedvr.engine import loader
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.errors import CheckpointError
from seedvr.tools import tiny, weights

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_for_the_fake_hub"
FILES_3B = ("seedvr2_ema_3b.pth", "ema_vae.pth", "pos_emb.pt", "neg_emb.pt")
FILES_7B = ("seedvr2_ema_7b.pth", "seedvr2_ema_7b_sharp.pth", "ema_vae.pth", "pos_emb.pt", "neg_emb.pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A hub on 127.0.0.1 whose CDN is `localhost` (another host name, as the hub's CDN is)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.corrupt: set[str] = set()  # files served with their last byte flipped
        self.truncate_once: set[str] = set()  # files whose first GET closes the connection halfway
        self.stall_once: set[str] = set()  # files whose first GET sends half, then waits for `release`
        self.half_sent, self.release = threading.Event(), threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (HubHandler,), {"hub": self}))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def find(self, filename: str) -> bytes:
        return next(files[filename] for files in self.repos.values() if filename in files)

    def gets(self, filename: str) -> list[dict]:
        """The headers of each GET of `filename`, in order."""
        return [headers for method, path, headers in self.requests if method == "GET" and path.endswith("/" + filename)]


class HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        hub = self.hub
        hub.requests.append((self.command, self.path, {key.lower(): value for key, value in self.headers.items()}))
        path = urlparse(self.path).path
        if resolve := re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path):
            repo, filename = resolve.groups()
            data = hub.repos.get(repo, {}).get(filename)
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif filename.endswith(".pth"):
                sha256 = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{hub.port}/cdn/{sha256}/{filename}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'W/"{git_blob_sha1(data)}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.serve(filename, data, send_body, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": COMMIT})
        elif cdn := re.fullmatch(r"/cdn/[0-9a-f]{64}/(.+)", path):
            self.serve(cdn.group(1), hub.find(cdn.group(1)), send_body, {})
        else:
            self.send_error(404)

    def serve(self, filename: str, data: bytes, send_body: bool, headers: dict) -> None:
        hub = self.hub
        if filename in hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        requested = self.headers.get("Range")
        start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1)) if requested else 0
        self.send_response(206 if requested else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not send_body:
            return
        if filename in hub.truncate_once | hub.stall_once:
            stall = filename in hub.stall_once
            hub.truncate_once.discard(filename)
            hub.stall_once.discard(filename)
            self.wfile.write(data[start:len(data) // 2])
            self.wfile.flush()
            if stall:
                hub.half_sent.set()
                hub.release.wait(60)
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_install")
    tiny.write(root)
    return root


def tiny_files(tiny_dir: Path, names) -> dict[str, bytes]:
    return {name: ((tiny_dir / "ckpts" / name) if name.endswith(".pth") else (tiny_dir / "embeddings" / name))
            .read_bytes() for name in names}


@pytest.fixture
def hub(tiny_dir):
    server = FakeHub({"ByteDance-Seed/SeedVR2-3B": tiny_files(tiny_dir, FILES_3B),
                      "ByteDance-Seed/SeedVR2-7B": tiny_files(tiny_dir, FILES_7B)})
    yield server
    server.stop()


def cli_env(tiny_dir: Path, target: Path, endpoint: str, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "SEEDVR_"))}
    env.update(SEEDVR_CONFIG_DIR=str(tiny_dir), SEEDVR_CKPT_DIR=str(target / "ckpts"),
               SEEDVR_EMBEDDINGS_DIR=str(target / "embeddings"), HF_ENDPOINT=endpoint, HF_HOME=str(target / "hf_home"),
               HF_TOKEN=TOKEN, HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seedvr.weights", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def downloaded(target: Path, name: str) -> Path:
    return target / ("ckpts" if name.endswith(".pth") else "embeddings") / name


def assert_exact_copies(target: Path, hub: FakeHub, names) -> None:
    for name in names:
        assert downloaded(target, name).read_bytes() == hub.find(name), name
    assert not list(target.rglob("*.part")) and not list(target.rglob("*.partial"))


def test_download_fetches_verifies_and_keeps_the_token_off_the_cdn(tiny_dir, hub, tmp_path):
    result = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint), "download", "--model", "seedvr2_7b_sharp")
    assert result.returncode == 0, result.stderr
    assert "seedvr2_7b_sharp: all files present and verified" in result.stdout
    assert_exact_copies(tmp_path, hub, ("seedvr2_ema_7b_sharp.pth", "ema_vae.pth", "pos_emb.pt", "neg_emb.pt"))
    assert not downloaded(tmp_path, "seedvr2_ema_7b.pth").exists()  # only the variant asked for

    heads = [(path, headers) for method, path, headers in hub.requests if method == "HEAD"]
    assert {path.rsplit("/", 1)[1] for path, _ in heads} == {"seedvr2_ema_7b_sharp.pth", "ema_vae.pth", "pos_emb.pt",
                                                             "neg_emb.pt"}
    assert all(path.startswith("/ByteDance-Seed/SeedVR2-7B/resolve/main/") for path, _ in heads)
    assert all(headers["authorization"] == f"Bearer {TOKEN}" for _, headers in heads)
    gets = {path.rsplit("/", 1)[1]: (path, headers) for method, path, headers in hub.requests if method == "GET"}
    for name in ("ema_vae.pth", "seedvr2_ema_7b_sharp.pth"):  # checkpoints come from the CDN, without the token
        assert gets[name][0].startswith("/cdn/") and "authorization" not in gets[name][1]
    for name in ("pos_emb.pt", "neg_emb.pt"):  # small files from the hub itself, with it
        assert "/resolve/main/" in gets[name][0] and gets[name][1]["authorization"] == f"Bearer {TOKEN}"

    hub.requests.clear()  # everything present: a second run asks the hub nothing
    again = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint), "download", "--model", "seedvr2_7b_sharp")
    assert again.returncode == 0, again.stderr
    assert hub.requests == []


@functools.cache
def long_embedding() -> bytes:
    """A valid pos_emb.pt of 23 MB: huggingface_hub writes what it receives in 10 MB chunks, so resuming needs
    a file that holds more than one of them before the cut (the tiny checkpoints are under 3 MB)."""
    buffer = io.BytesIO()
    torch.save(torch.randn(240_000, tiny.TEXT_CHANNELS, generator=torch.Generator().manual_seed(0))
               .to(torch.bfloat16), buffer)
    assert len(buffer.getvalue()) > 2 * DOWNLOAD_CHUNK_SIZE
    return buffer.getvalue()


def test_a_body_cut_halfway_resumes_with_a_range_request(tiny_dir, hub, tmp_path):
    name = "pos_emb.pt"
    hub.repos["ByteDance-Seed/SeedVR2-3B"][name] = long_embedding()
    hub.truncate_once.add(name)
    result = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint), "download", "--model", "seedvr2_3b")
    assert result.returncode == 0, result.stderr
    gets = hub.gets(name)
    assert len(gets) == 2 and "range" not in gets[0]
    assert gets[1]["range"] == f"bytes={DOWNLOAD_CHUNK_SIZE}-"  # the whole chunks received before the cut
    assert_exact_copies(tmp_path, hub, FILES_3B)


def test_a_killed_download_resumes_in_the_next_run(tiny_dir, hub, tmp_path):
    name = "pos_emb.pt"
    hub.repos["ByteDance-Seed/SeedVR2-3B"][name] = long_embedding()
    hub.stall_once.add(name)
    env = cli_env(tiny_dir, tmp_path, hub.endpoint)
    process = subprocess.Popen([sys.executable, "-m", "seedvr.weights", "download", "--model", "seedvr2_3b"],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.half_sent.wait(60), "the download never started"
        partials = []
        for _ in range(100):  # until the client has written the whole chunks it received
            partials = list((tmp_path / "embeddings").glob(f"{name}.*.part"))
            if partials and partials[0].stat().st_size == DOWNLOAD_CHUNK_SIZE:
                break
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert kept == DOWNLOAD_CHUNK_SIZE
    hub.release.set()

    result = run_cli(env, "download", "--model", "seedvr2_3b")
    assert result.returncode == 0, result.stderr
    assert f"resuming at byte {kept}" in result.stdout
    assert hub.gets(name)[-1]["range"] == f"bytes={kept}-"
    assert_exact_copies(tmp_path, hub, FILES_3B)


def test_bytes_that_do_not_match_the_checksum_are_refused(tiny_dir, hub, tmp_path):
    hub.corrupt.add("ema_vae.pth")
    result = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint), "download", "--model", "seedvr2_3b")
    assert result.returncode == 1
    assert "ByteDance-Seed/SeedVR2-3B/ema_vae.pth" in result.stderr and "checksum" in result.stderr
    assert not downloaded(tmp_path, "ema_vae.pth").exists() and not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("kind", ["sha256", "git blob sha1"])
def test_check_content_compares_with_the_hash_the_etag_is(tmp_path, kind):
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest() if kind == "sha256" else git_blob_sha1(data)
    path = tmp_path / "file"
    path.write_bytes(data)
    weights.check_content(path, digest, "repo/file")
    weights.check_content(path, "an-opaque-etag", "repo/file")  # nothing to compare with
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="repo/file: the downloaded bytes do not match"):
        weights.check_content(path, digest, "repo/file")
    assert not path.exists()


def test_a_checkpoint_that_does_not_fit_the_model_fails_naming_file_and_keys(tiny_dir, hub, tmp_path):
    state_dict = torch.load(tiny_dir / "ckpts" / "seedvr2_ema_3b.pth", weights_only=True)
    renamed, reshaped = sorted(state_dict)[:2]
    state_dict[renamed + "_old"] = state_dict.pop(renamed)
    state_dict[reshaped] = torch.zeros(3, 5)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    hub.repos["ByteDance-Seed/SeedVR2-3B"]["seedvr2_ema_3b.pth"] = buffer.getvalue()

    result = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint), "download", "--model", "seedvr2_3b")
    assert result.returncode == 1
    message = result.stderr
    assert "MODEL_NOT_AVAILABLE" in message and str(tmp_path / "ckpts" / "seedvr2_ema_3b.pth") in message
    assert f"missing {renamed} " in message and f"unexpected {renamed}_old " in message
    assert f"shape of {reshaped}: expected" in message and "got 3x5" in message


def test_an_unreachable_hub_fails_within_two_seconds(tiny_dir, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    timed = ("import time\nfrom seedvr.tools import weights\nfrom seedvr.errors import CheckpointError\n"
             "start = time.monotonic()\ntry:\n    weights.download('seedvr2_3b')\nexcept CheckpointError as error:\n"
             "    print(f'{time.monotonic() - start:.3f}'); print(error)\n")
    env = cli_env(tiny_dir, tmp_path, f"http://127.0.0.1:{closed_port}")
    result = subprocess.run([sys.executable, "-c", timed], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    elapsed, message = result.stdout.split("\n", 1)
    assert float(elapsed) < 2.0, result.stdout
    assert f"cannot reach http://127.0.0.1:{closed_port}" in message and "SEEDVR_CKPT_DIR" in message


def test_offline_mode_fails_at_once_without_a_request(tiny_dir, hub, tmp_path):
    result = run_cli(cli_env(tiny_dir, tmp_path, hub.endpoint, HF_HUB_OFFLINE="1"), "download", "--model", "seedvr2_3b")
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set" in result.stderr and "seedvr2_ema_3b.pth" in result.stderr
    assert hub.requests == []


def test_the_worker_downloads_a_missing_model_on_first_use(tiny_dir, hub, tmp_path):
    first_use = ("from seedvr.serving.model_holder import ModelHolder\nfrom seedvr.serving.specs import ModelChoice\n"
                 "holder = ModelHolder()\nmodel = holder.ensure(holder.resolve(ModelChoice('seedvr2_3b')))\n"
                 "print(model.model_type, model.random_weights)\n")
    env = cli_env(tiny_dir, tmp_path, hub.endpoint, SEEDVR_AUTO_DOWNLOAD="1")
    result = subprocess.run([sys.executable, "-c", first_use], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("seedvr2_3b True")
    assert_exact_copies(tmp_path, hub, FILES_3B)


# Convert (in process: no hub involved)
@pytest.fixture
def installation(tiny_dir, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "install"
    shutil.copytree(tiny_dir, root)
    monkeypatch.setenv("SEEDVR_CONFIG_DIR", str(root))
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(root / "ckpts"))
    monkeypatch.setenv("SEEDVR_EMBEDDINGS_DIR", str(root / "embeddings"))
    return root


def built(model_type: str, checkpoint: Path):
    """The DiT as the loader builds it for a GPU: strict load, fp32, then the bf16 compute policy."""
    dit, _ = loader.build_models(model_type, loader.load_config(model_type))
    load_strict(dit, read_state_dict(checkpoint), checkpoint)
    return dit.to(torch.float32).to_compute_dtype(torch.bfloat16)


def test_convert_keeps_exactly_what_the_bf16_policy_keeps_in_fp32(installation):
    ckpts = installation / "ckpts"
    weights.convert("seedvr2_3b")
    converted, original = load_file(ckpts / "seedvr2_ema_3b.safetensors"), read_state_dict(ckpts / "seedvr2_ema_3b.pth")
    reference = built("seedvr2_3b", ckpts / "seedvr2_ema_3b.pth").state_dict()
    assert converted.keys() == original.keys() == reference.keys()
    for key, tensor in converted.items():
        assert tensor.dtype == reference[key].dtype, key
        assert torch.equal(tensor, original[key].to(tensor.dtype)), key
    fp32 = [key for key, tensor in converted.items() if tensor.dtype == torch.float32]
    assert any(key.endswith("rope.freqs") for key in fp32) and any(".ada." in key for key in fp32)
    assert sum(tensor.dtype == torch.bfloat16 for tensor in converted.values()) > len(fp32) // 2

    vae, vae_original = load_file(ckpts / "ema_vae.safetensors"), read_state_dict(ckpts / "ema_vae.pth")
    assert vae.keys() == vae_original.keys()
    assert all(vae[key].dtype == torch.bfloat16 and torch.equal(vae[key], vae_original[key].to(torch.bfloat16))
               for key in vae)


def test_the_loader_prefers_the_converted_files(installation):
    ckpts = installation / "ckpts"
    weights.convert("seedvr2_7b", delete_pth=True)
    assert not (ckpts / "seedvr2_ema_7b.pth").exists() and not (ckpts / "ema_vae.pth").exists()
    files = loader.check_files("seedvr2_7b", "normal")
    assert (files.dit.name, files.vae.name) == ("seedvr2_ema_7b.safetensors", "ema_vae.safetensors")
    model = loader.load_pipeline("seedvr2_7b", device=torch.device("cpu"))
    assert model.random_weights
    weights.download("seedvr2_7b")  # every file present: verifies, asks no hub (HF_ENDPOINT is not even set)


def test_converted_and_original_dits_are_identical_under_the_gpu_policy(installation, tiny_dir):
    weights.convert("seedvr2_7b_sharp")
    from_pth = built("seedvr2_7b", tiny_dir / "ckpts" / "seedvr2_ema_7b_sharp.pth").state_dict()
    from_safetensors = built("seedvr2_7b", installation / "ckpts" / "seedvr2_ema_7b_sharp.safetensors").state_dict()
    assert all(from_pth[key].dtype == tensor.dtype and torch.equal(from_pth[key], tensor)
               for key, tensor in from_safetensors.items())


def test_convert_twice_keeps_the_first_and_a_truncated_file_fails_verify(installation, capsys):
    weights.convert("seedvr2_3b")
    target = installation / "ckpts" / "seedvr2_ema_3b.safetensors"
    written = target.stat().st_mtime_ns
    weights.convert("seedvr2_3b")
    assert target.stat().st_mtime_ns == written and f"{target} exists, kept" in capsys.readouterr().out
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        weights.verify("seedvr2_3b", "normal")


def test_write_safetensors_round_trips_through_the_safetensors_reader(tmp_path):
    tensors = {"matrix": torch.randn(5, 7), "transposed": torch.randn(4, 6).t(), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "steps": torch.arange(10), "mask": torch.rand(9) > 0.5,
               "half": torch.randn(3, 3).half()}
    dtypes = {key: tensor.dtype for key, tensor in tensors.items()} | {"matrix": torch.bfloat16}
    path = tmp_path / "round_trip.safetensors"
    weights.write_safetensors(path, tensors, dtypes, {"format": "pt", "note": "test"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == dtypes[key] and torch.equal(loaded[key], tensor.to(dtypes[key])), key
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"format": "pt", "note": "test"}
    assert not list(tmp_path.glob("*.partial"))
