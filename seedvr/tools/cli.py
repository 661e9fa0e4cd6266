"""Restore local files from the command line, through the worker's own code path.

    python -m seedvr restore INPUT... -o OUTDIR [options]

INPUT: files or folders (a folder means the files directly in it). The options are the restore request's
fields (`python -m seedvr restore --help` lists them), validated by the same schema as the handler's; each
file is restored by the same function as a handler job, with the model loaded once. A progress bar per
file, a summary table at the end, then the warnings the worker's answers would carry (random weights, and
any `warnings` of an item); the exit status is 1 when any file failed. Logs below WARNING stay quiet (the
encoder probe's "NVENC cannot encode here" on a CPU machine among them).
"""

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from seedvr import settings
from seedvr.errors import RestoreError
from seedvr.io.delivery import Delivered, DeliverySpec
from seedvr.io.inputs import local_input
from seedvr.serving import jobs
from seedvr.serving.answer import restore_answer
from seedvr.serving.cancel import CancelToken
from seedvr.serving.early_warnings import early_warnings
from seedvr.serving.model_holder import LoadedModel, ModelHolder, ModelSpec
from seedvr.serving.progress import Progress
from seedvr.serving.schema import REQUIRED, TABLE, Boolean, Choice, Integer, Number, RestoreRequest, parse_request
from seedvr.serving.specs import RestoreSpec, restore_spec

# Fields that carry the media or only make sense for a JSON answer.
NOT_OPTIONS = {"action", "media", "video", "image", "media_url", "output_delivery", "return_data_uri"}
ARGUMENT_TYPES: dict[type, type] = {Integer: int, Number: float}
# Results are written to files, never carried inline in an answer: the delivery of a bucket URL is the one
# without an inline size limit (so no "will not fit in the answer" warning); nothing is uploaded.
FILE_DELIVERY = DeliverySpec("url")


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """One --option per restore field; defaults stay with the schema (absent = not given)."""
    for field in TABLE["restore"]:
        if field.name in NOT_OPTIONS:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = "" if field.default in (REQUIRED, None) else f" (default {field.default})"
        if isinstance(field.accepts, Boolean):
            parser.add_argument(flag, dest=field.name, action="store_true", default=None, help=field.doc)
            continue
        choices = field.accepts.options if isinstance(field.accepts, Choice) else None
        parser.add_argument(flag, dest=field.name, type=ARGUMENT_TYPES.get(type(field.accepts), str),
                            choices=choices, default=None, help=field.doc + default)


def expand(inputs: list[Path]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir():
            files += sorted(child for child in path.iterdir() if child.is_file() and not child.name.startswith("."))
        else:
            files.append(path)
    return files


class Bar:
    """A tqdm bar fed by the job's progress updates."""

    def __init__(self, name: str, frames: int):
        self.bar = tqdm(total=frames, desc=name, unit="frame", leave=True, file=sys.stderr)

    def __call__(self, update: dict) -> None:
        self.bar.n = update["frames_done"]
        self.bar.set_postfix_str(update["phase"] or "")  # redraws

    def close(self) -> None:
        self.bar.close()


class BarProgress(Progress):
    """The job's progress with every phase and every finished frame drawn on the bar at once. Progress itself
    sends a frame count at most once a second (RunPod's webhook), so a clip whose frames all finish within a
    second jumped from 0 to the end."""

    def __init__(self, frames_total: int, bar: Bar):
        super().__init__(frames_total, None)
        self.bar = bar

    def phase(self, name: str) -> None:
        super().phase(name)
        self.bar(self.update())

    def advance(self, frames: int) -> None:
        super().advance(frames)
        self.bar(self.update())


class Announcement:
    """Says once, on stderr, which model runs where (the first file loads it)."""

    def __init__(self) -> None:
        self.said = False

    def __call__(self, model: LoadedModel) -> None:
        if self.said:
            return
        devices = model.restorer.devices
        where = f"{len(devices)} processes ({', '.join(devices)})" if len(devices) > 1 else devices[0]
        weights = ", random weights: the output is noise" if model.random_weights else ""
        tqdm.write(f"{model.model_type} ({model.variant}) on {where}{weights}", file=sys.stderr)  # above the bar
        self.said = True


def output_stems(files: list[Path]) -> list[str]:
    """A distinct stem per input: the file's stem, with its extension added where two inputs share one."""
    stems = [path.stem for path in files]
    return [f"{path.stem}_{path.suffix.lstrip('.')}" if stems.count(path.stem) > 1 else path.stem
            for path in files]


def answer_warnings(answer: dict) -> list[str]:
    """What an answer warns of: its `warning` (random weights), then each entry of its `warnings`."""
    return ([answer["warning"]] if answer.get("warning") else []) + [str(text) for text in answer.get("warnings", [])]


def restore_file(holder: ModelHolder, spec: RestoreSpec, model: ModelSpec, path: Path, outdir: Path, stem: str,
                 index: int, announce: Callable[[LoadedModel], None]) -> dict:
    """Restore one file into outdir: the summary row, with `warnings` (those of the worker's answer)."""
    started = time.perf_counter()
    row: dict[str, object] = {"file": str(path), "kind": "-", "input": "-", "output": "-", "frames": "-", "status": "ok",
                              "warnings": []}
    with tempfile.TemporaryDirectory(prefix="seedvr-cli-") as tmp:
        workdir = Path(tmp)
        try:
            item = local_input(path, spec.media, index=index)
            (size,) = jobs.sizes_of(spec, [item])  # fail before loading the model
            warnings = early_warnings(spec, [item], [size])  # logged now (WARNING), answered below
            row.update(kind=item.kind, input=f"{item.width}x{item.height}", frames=item.frame_count)
            bar = Bar(path.name, item.frame_count)
            try:
                with holder.use(model) as loaded:
                    announce(loaded)
                    restored = jobs.restore_item(loaded, spec, item, size, workdir,
                                                 BarProgress(item.frame_count, bar), CancelToken())
            finally:
                bar.close()
            target = outdir / f"{stem}.restored{restored.output.path.suffix}"
            shutil.move(restored.output.path, target)
            if restored.comparison is not None:
                shutil.move(restored.comparison.path, outdir / f"{stem}.compare.png")
            # The answer the worker would give for this item, delivered as a file: its warnings are ours.
            restored.delivered = Delivered("file", str(target), target.stat().st_size)
            answer = restore_answer(spec, loaded, [restored], time.perf_counter() - started, warnings)
            row.update(output=f"{restored.width}x{restored.height}", written=str(target),
                       warnings=answer_warnings(answer))
        except RestoreError as error:
            row["status"] = str(error)
    row["seconds"] = f"{time.perf_counter() - started:.1f}"
    return row


def print_summary(rows: list[dict]) -> None:
    columns = ("file", "kind", "input", "output", "frames", "seconds", "status")
    widths = {name: max(len(name), *(len(str(row.get(name, ""))[:80]) for row in rows)) for name in columns}
    print("  ".join(name.ljust(widths[name]) for name in columns))
    for row in rows:
        print("  ".join(str(row.get(name, ""))[:80].ljust(widths[name]) for name in columns))


def print_warnings(rows: list[dict]) -> None:
    """Each warning once, on stderr after the summary: one that every restored file got (random weights) without
    file names, any other after the files it concerns."""
    restored = {row["file"] for row in rows if row["status"] == "ok"}
    for text in dict.fromkeys(text for row in rows for text in row["warnings"]):
        files = [row["file"] for row in rows if text in row["warnings"]]
        where = "" if set(files) >= restored else f" ({', '.join(Path(file).name for file in files)})"
        print(f"warning: {text}{where}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedvr", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    restore = commands.add_parser("restore", help="restore files or folders of videos and images")
    restore.add_argument("inputs", nargs="+", type=Path, help="files, or folders of files")
    restore.add_argument("-o", "--outdir", type=Path, required=True, help="where the results go")
    add_request_options(restore)
    args = parser.parse_args(argv)
    # force: importing runpod (the serving package does) has already set the root logger to INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)

    options = {name: value for name, value in vars(args).items()
               if value is not None and name not in ("command", "inputs", "outdir")}
    holder = ModelHolder()
    try:
        settings.current()
        request = parse_request({"action": "restore", **options}, media_required=False)
        assert isinstance(request, RestoreRequest)
        spec = replace(restore_spec(request), delivery=FILE_DELIVERY)
        model = holder.resolve(spec.model)  # sp_size > 1 runs a group of rank processes, as the worker does
    except (RestoreError, settings.SettingsError) as error:
        parser.error(str(error))
    files = expand(args.inputs)
    if not files:
        parser.error("no input files found")
    args.outdir.mkdir(parents=True, exist_ok=True)
    try:
        announce = Announcement()
        rows = [restore_file(holder, spec, model, path, args.outdir, stem, index, announce)
                for index, (path, stem) in enumerate(zip(files, output_stems(files)))]
    finally:
        holder.release()
    print_summary(rows)
    print_warnings(rows)
    return 0 if all(row["status"] == "ok" for row in rows) else 1
