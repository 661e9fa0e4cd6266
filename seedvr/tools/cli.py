"""Restore local files from the command line, through the worker's own code path.

    python -m seedvr restore INPUT... -o OUTDIR [options]

INPUT: files or folders (a folder means the files directly in it). The options are the restore request's
fields (`python -m seedvr restore --help` lists them), validated by the same schema as the handler's; each
file is restored by the same function as a handler job, with the model loaded once. A progress bar per
file, a summary table at the end; the exit status is 1 when any file failed.
"""

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from seedvr import settings
from seedvr.errors import RestoreError
from seedvr.io.inputs import local_input
from seedvr.serving import jobs
from seedvr.serving.cancel import CancelToken
from seedvr.serving.model_holder import LoadedModel, ModelHolder, ModelSpec
from seedvr.serving.progress import Progress
from seedvr.serving.schema import REQUIRED, TABLE, Boolean, Choice, Integer, Number, RestoreRequest, parse_request
from seedvr.serving.specs import RestoreSpec, restore_spec

# Fields that carry the media or only make sense for a JSON answer.
NOT_OPTIONS = {"action", "media", "video", "image", "media_url", "output_delivery", "return_data_uri"}
ARGUMENT_TYPES: dict[type, type] = {Integer: int, Number: float}


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
        self.bar.set_postfix_str(update["phase"] or "")

    def close(self) -> None:
        self.bar.close()


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
        print(f"{model.model_type} ({model.variant}) on {where}{weights}", file=sys.stderr, flush=True)
        self.said = True


def output_stems(files: list[Path]) -> list[str]:
    """A distinct stem per input: the file's stem, with its extension added where two inputs share one."""
    stems = [path.stem for path in files]
    return [f"{path.stem}_{path.suffix.lstrip('.')}" if stems.count(path.stem) > 1 else path.stem
            for path in files]


def restore_file(holder: ModelHolder, spec: RestoreSpec, model: ModelSpec, path: Path, outdir: Path, stem: str,
                 index: int, announce: Callable[[LoadedModel], None]) -> dict:
    started = time.perf_counter()
    row: dict[str, object] = {"file": str(path), "kind": "-", "input": "-", "output": "-", "frames": "-", "status": "ok"}
    with tempfile.TemporaryDirectory(prefix="seedvr-cli-") as tmp:
        workdir = Path(tmp)
        try:
            item = local_input(path, spec.media.media_type, index=index)
            (size,) = jobs.sizes_of(spec, [item])  # fail before loading the model
            row.update(kind=item.kind, input=f"{item.width}x{item.height}", frames=item.frame_count)
            bar = Bar(path.name, item.frame_count)
            try:
                with holder.use(model) as loaded:
                    announce(loaded)
                    restored = jobs.restore_item(loaded, spec, item, size, workdir, Progress(item.frame_count, bar),
                                                 CancelToken())
            finally:
                bar.close()
            target = outdir / f"{stem}.restored{restored.output.path.suffix}"
            shutil.move(restored.output.path, target)
            if restored.comparison is not None:
                shutil.move(restored.comparison.path, outdir / f"{stem}.compare.png")
            row.update(output=f"{restored.width}x{restored.height}", written=str(target))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedvr", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    restore = commands.add_parser("restore", help="restore files or folders of videos and images")
    restore.add_argument("inputs", nargs="+", type=Path, help="files, or folders of files")
    restore.add_argument("-o", "--outdir", type=Path, required=True, help="where the results go")
    add_request_options(restore)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    options = {name: value for name, value in vars(args).items()
               if value is not None and name not in ("command", "inputs", "outdir")}
    holder = ModelHolder()
    try:
        settings.current()
        request = parse_request({"action": "restore", **options}, media_required=False)
        assert isinstance(request, RestoreRequest)
        spec = restore_spec(request)
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
    return 0 if all(row["status"] == "ok" for row in rows) else 1
