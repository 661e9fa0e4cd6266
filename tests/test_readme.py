"""The README's promises: its field tables, its two set-up commands, its Markdown, every size and format it
names, its curl examples (run for real with bash against the local API server), and `python handler.py` on
test_input.json."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest
from worker_server import REPO_ROOT, WorkerServer, tiny_environment

from seedvr.engine.sizing import SizeWishes, item_size
from seedvr.io.media.payload import ACCEPTED
from seedvr.io.media.video import probe_video
from seedvr.serving.answer import RANDOM_WEIGHTS_WARNING
from seedvr.serving.schema import PRESETS, describe, parse_request

README = (REPO_ROOT / "README.md").read_text()
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")  # a CommonMark code fence opens or closes on such a line
HEADING = re.compile(r"^ {0,3}#{1,6}( |$)")
SECTION_HEADING = re.compile(r"^ {0,3}#{2,6}( |$)")  # the README's headings below its title; in code, "# " is a comment
ANY_AREA_CAP = 10**9  # the size examples are about the aspect rule, not the worker's area cap


def scan_fences(text: str) -> tuple[list[bool], bool]:
    """Per line, whether it belongs to a fenced code block (fence lines included), and whether the last block is
    left open at the end of the text."""
    inside: list[bool] = []
    opener = ""
    for line in text.splitlines():
        fence = FENCE.match(line)
        if opener:
            inside.append(True)
            closes = fence and fence.group(1)[0] == opener[0] and len(fence.group(1)) >= len(opener)
            if closes and not line.strip().strip(opener[0]):  # a closing fence carries no info string
                opener = ""
        else:
            inside.append(bool(fence))
            opener = fence.group(1) if fence else ""
    return inside, bool(opener)


def fence_problems(text: str) -> list[str]:
    """Headings that render as code, and a code block never closed."""
    inside, left_open = scan_fences(text)
    problems = [f"line {index + 1} is a heading inside a code block: {line!r}"
                for index, line in enumerate(text.splitlines()) if inside[index] and SECTION_HEADING.match(line)]
    return problems + (["the last code block is never closed"] if left_open else [])


def headings(text: str) -> list[tuple[int, str]]:
    """(line index, heading) of every heading outside code."""
    inside, _ = scan_fences(text)
    return [(index, line) for index, line in enumerate(text.splitlines()) if HEADING.match(line) and not inside[index]]


def section(text: str, heading: str) -> str:
    """The text under the first heading that starts with `heading`, up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    found = headings(text)
    start = next(index for index, line in found if line.startswith(heading))
    end = next((index for index, line in found if index > start and len(line) - len(line.lstrip("#")) <= level),
               None)
    return "\n".join(text.splitlines()[start + 1:end])


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_field_tables_equal_the_schema():
    block = README.split("<!-- fields:begin -->\n", 1)[1].split("<!-- fields:end -->", 1)[0]
    assert block.strip() == describe().strip()


def test_the_test_command_is_the_one_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    pins = re.search(r'^python -m pip install -q (.+) -e "\.\[test\]"$', ci, flags=re.MULTILINE).group(1)
    assert f'pip install {pins} -e ".[test]" && {command}' in README
    assert ci.strip().splitlines()[-1] == command


def test_every_code_fence_is_closed_and_every_heading_is_outside_code():
    assert fence_problems(README) == []
    assert {"## Deploying", "## Parity: how we know it is the real model", "## Layout"} <= {
        line for _, line in headings(README)}
    # the checker itself, on the bug it was written for: the Deploying section's closing fence missing
    lines = README.splitlines()
    deploying = lines.index("## Deploying")
    closing = next(index for index in range(deploying, len(lines)) if lines[index] == "```")
    broken = "\n".join(lines[:closing] + lines[closing + 1:])
    assert any("## Parity" in problem for problem in fence_problems(broken))
    assert "the last code block is never closed" in fence_problems(README + "\n```bash\necho\n")


def test_json_examples_are_valid_requests(tmp_path, monkeypatch):
    examples = re.findall(r"-d '(\{\"input\": \{.*?\}\})'", README)
    examples += re.findall(r"^(\{\"input\": \{.*\}\})$", README, flags=re.MULTILINE)
    assert len(examples) >= 11
    # the upscaler the examples name, present as a worker would have it (the schema checks names on disk)
    upscalers = {json.loads(example)["input"].get(field) for example in examples
                 for field in ("upscaler", "fallback_upscaler")} - {None}
    (tmp_path / "upscalers").mkdir()
    for name in upscalers:
        (tmp_path / "upscalers" / f"{name}.safetensors").write_bytes(b"")
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(tmp_path))
    for example in examples:
        parse_request(json.loads(example)["input"])


def test_every_size_example_is_what_the_code_computes():
    """'a 16:9 input (640×360) becomes 1280×720' at the default area, the preset areas, the memory table's
    '720p (1280x720)' rows (a 16:9 input at the preset of that height), and the restore answer's sizes."""
    checked = 0
    for ratio_w, ratio_h, width, height, out_w, out_h in re.findall(
            r"(\d+):(\d+) input \((\d+)×(\d+)\)(?: becomes)? (\d+)×(\d+)", README):
        assert int(width) * int(ratio_h) == int(height) * int(ratio_w), f"{width}×{height} is not {ratio_w}:{ratio_h}"
        size = item_size(SizeWishes(), int(height), int(width), ANY_AREA_CAP)
        assert (size.width, size.height) == (int(out_w), int(out_h)), f"a {width}×{height} input"
        checked += 1
    assert checked >= 3
    presets = re.findall(r"^\| `(\w+)` \| (\w+) \| (\d+)×(\d+) \|", README, flags=re.MULTILINE)
    assert {name for name, *_ in presets} == set(PRESETS)
    for name, model, width, height in presets:
        assert PRESETS[name][0] == model
        assert sorted(PRESETS[name][1]) == sorted((int(width), int(height))), name  # an area: either order
    by_height = {min(area): area for _, area in PRESETS.values()}
    rows = set(re.findall(r"\| (\d+)p \((\d+)x(\d+)\) \|", README))
    assert len(rows) == 3
    for lines, out_w, out_h in rows:
        res_h, res_w = by_height[int(lines)]
        size = item_size(SizeWishes(res_h, res_w), 1080, 1920, ANY_AREA_CAP)
        assert (size.width, size.height) == (int(out_w), int(out_h)), f"{lines}p"
    restore = section(README, "### `restore`")
    answer = json.loads(code_blocks(restore, "json")[0])
    request = re.search(r"res_h: (\d+), res_w: (\d+)", restore)
    assert request
    in_w, in_h = map(int, answer["processing_info"]["input_resolution"].split("x"))
    size = item_size(SizeWishes(int(request[1]), int(request[2])), in_h, in_w, ANY_AREA_CAP)
    assert size.describe() == answer["resolution"]


def test_the_accepted_formats_are_the_ones_the_error_names():
    """The Errors table lists exactly what an UNSUPPORTED_MEDIA message names (payload.ACCEPTED, read now)."""
    row = next(line for line in README.splitlines() if line.startswith("| `UNSUPPORTED_MEDIA` |"))
    listed = re.search(r"accepted formats \((.*)\) \|$", row)
    assert listed, row
    assert listed[1] == ACCEPTED


def test_test_input_is_a_valid_restore_request():
    request = parse_request(json.loads((REPO_ROOT / "test_input.json").read_text())["input"])
    assert request.action == "restore" and request.media_values


@pytest.mark.slow
def test_python_handler_runs_test_input_json_and_writes_the_result_to_a_file(tiny_dir, tmp_path):
    """The README's first command, with the tiny installation it writes: the restored video lands in
    ./outputs/local_test/, the log names it, and no base64 reaches the console."""
    shutil.copy(REPO_ROOT / "test_input.json", tmp_path)  # the SDK reads it from the current folder
    result = subprocess.run([sys.executable, str(REPO_ROOT / "handler.py")], cwd=tmp_path, capture_output=True,
                            text=True, env=tiny_environment(tiny_dir, tmp_path), timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-2000:]
    assert "Job local_test completed successfully." in console
    written = tmp_path / "outputs" / "local_test" / "restored0.mp4"
    assert str(written) in console
    assert probe_video(written).frame_count == probe_video(REPO_ROOT / "examples" / "clip.mp4").frame_count
    blob = re.search(r"[A-Za-z0-9+/]{200,}", console)
    assert blob is None, f"base64 on the console: {blob[0][:80]}..."


# ---------------------------------------------------------------------- the curl examples, run for real

EXAMPLE_AREA = "res_h: 1280, res_w: 720"
SMALL_AREA = "res_h: 96, res_w: 128"  # the tiny model on a CPU: a 128x96 output keeps the test quick
CLIP_FRAMES = 9


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """input.mp4 of over 1 MB (lossless noise), so its base64 is far past the kernel's 128 KiB per argument."""
    path = tmp_path_factory.mktemp("clip") / "input.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=320x240:r=24",
                    "-frames:v", str(CLIP_FRAMES), "-vf", "noise=alls=100:allf=t+u", "-c:v", "libx264", "-qp", "0",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)], check=True)
    assert path.stat().st_size > 1 << 20
    return path


@pytest.fixture(scope="module")
def api(tiny_dir, tmp_path_factory):
    """`python handler.py --rp_serve_api` on the tiny installation."""
    worker = WorkerServer(tiny_environment(tiny_dir, tmp_path_factory.mktemp("jobs")),
                          tmp_path_factory.mktemp("log") / "worker.log")
    yield worker
    worker.stop()


def readme_commands(heading: str) -> list[str]:
    """The bash blocks of a section of the README, in order."""
    blocks = code_blocks(section(README, heading), "bash")
    assert blocks, heading
    return blocks


def run_bash(script: str, api: WorkerServer, folder: Path) -> subprocess.CompletedProcess:
    script = script.replace("localhost:8000", f"127.0.0.1:{api.port}")
    return subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=120)


def restore_blocks() -> tuple[str, str, str, str]:
    build, sync, read, poll = readme_commands("### `restore`")
    assert "> request.json" in build and EXAMPLE_AREA in build
    assert "/runsync" in sync and "--data-binary @request.json" in sync
    assert "answer.json" in read and "/run " in poll and "/status/" in poll
    return build.replace(EXAMPLE_AREA, SMALL_AREA), sync, read, poll


@pytest.mark.slow
def test_readme_curl_examples_work_on_a_clip_over_1_mb(api, clip, tmp_path):
    """health and initialize as written; restore with /runsync, then with /run and /status polling: each writes
    restored.mp4 (every frame) and shows the answer's random-weights warning."""
    shutil.copy(clip, tmp_path / "input.mp4")
    (health,) = readme_commands("### `health`")
    result = run_bash(health, api, tmp_path)
    assert json.loads(result.stdout)["output"]["status"] == "healthy", result.stdout + result.stderr
    (initialize,) = readme_commands("### `initialize`")
    result = run_bash(initialize, api, tmp_path)
    assert json.loads(result.stdout)["output"]["ready"] is True, result.stdout + result.stderr
    build, sync, read, poll = restore_blocks()
    for name, send in (("runsync", sync), ("run + status", poll)):
        (tmp_path / "restored.mp4").unlink(missing_ok=True)
        result = run_bash("\n".join([build, send, read]), api, tmp_path)
        assert result.returncode == 0 and result.stderr == "", f"{name}: {result.stdout}{result.stderr}"
        assert (tmp_path / "request.json").stat().st_size > clip.stat().st_size
        assert result.stdout.splitlines() == ["restored.mp4 written", RANDOM_WEIGHTS_WARNING], name
        restored = probe_video(tmp_path / "restored.mp4")
        assert (restored.width, restored.height, restored.frame_count) == (128, 96, CLIP_FRAMES), name


@pytest.mark.slow
def test_readme_restore_example_shows_the_error_of_a_failed_job(api, clip, tmp_path):
    shutil.copy(clip, tmp_path / "input.mp4")
    build, sync, read, _ = restore_blocks()
    result = run_bash("\n".join([build.replace(SMALL_AREA, "res_h: 5, res_w: 128"), sync, read]), api, tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    assert result.stdout.startswith("FAILED: INVALID_INPUT: res_h must be an integer between 16 and 8192"), \
        result.stdout
    assert not (tmp_path / "restored.mp4").exists()
