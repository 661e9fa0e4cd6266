"""Fetch, check and convert the official SeedVR2 weights.

    python -m seedvr.weights download --model seedvr2_3b | seedvr2_7b | seedvr2_7b_sharp
    python -m seedvr.weights verify   --model ...
    python -m seedvr.weights convert  --model ... [--delete-pth]
    python -m seedvr.weights download --model rife   (frame interpolation: RIFE 4.13.2, pinned file and sha256)

Files come from the Hugging Face repos ByteDance-Seed/SeedVR2-3B and
ByteDance-Seed/SeedVR2-7B into SEEDVR_CKPT_DIR / SEEDVR_EMBEDDINGS_DIR
(defaults: ckpts/ and embeddings/, or /runpod-volume/seedvr/ when a network
volume is mounted). A download keeps its bytes in `<file>.<etag>.part`, so a
run that was interrupted (even killed) resumes where it stopped. Each file is
checked: its bytes against the hub's checksum, then every checkpoint key and
shape against our model classes (built on the meta device, nothing loaded),
and the embeddings against the DiT's text width. An unreachable or offline hub
fails within seconds, naming the folders to copy the files into instead.

`convert` writes bf16 .safetensors next to the .pth files, which the loader
then prefers: DiT Linear weights and biases in bf16 and everything else fp32
(what `NaDiT*.to_compute_dtype` keeps), the VAE in bf16 throughout; on a GPU
the model computes exactly as from the .pth, from files half the size.
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import httpx2
import torch
from huggingface_hub import HfFileMetadata, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from safetensors import SafetensorError, safe_open

from seedvr.engine import interpolation, loader
from seedvr.engine.checkpoint import compare_shapes, describe_mismatches, read_state_dict, state_dict_shapes
from seedvr.errors import CheckpointError, RestoreError
from seedvr.models.registry import WEIGHT_SETS, card, split_weight_set
from seedvr.models.rife import RIFE_WEIGHTS, IFNet
from seedvr.models.vae import VideoAutoencoder, convert_legacy_vae_keys

REACH_TIMEOUT_S = 2.0  # to connect to the hub: an unreachable hub fails this fast, without retries
ANSWER_TIMEOUT_S = 10.0  # for the hub's answer once connected
HASH_CHUNK_BYTES = 16 << 20
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
COPY_HINT = "or copy the files into SEEDVR_CKPT_DIR / SEEDVR_EMBEDDINGS_DIR"


# Download
def hub_metadata(repo: str, filename: str, revision: str | None = None) -> HfFileMetadata:
    """The hub's answer to HEAD /{repo}/resolve/{revision or main}/{filename}: where to GET it, its ETag and size."""
    if constants.is_offline_mode():
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so {repo}/{filename} cannot be downloaded: unset it, {COPY_HINT}")
    try:
        timeout = httpx2.Timeout(ANSWER_TIMEOUT_S, connect=REACH_TIMEOUT_S)
        metadata = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision),
                                        timeout=timeout)  # type: ignore[arg-type]  # annotated float; httpx2 takes a Timeout
    except httpx2.TransportError as error:
        raise CheckpointError(f"cannot reach {constants.ENDPOINT} to download {repo}/{filename} "
                              f"({type(error).__name__}): check the network, {COPY_HINT}") from None
    except httpx2.HTTPError as error:  # the hub answered with an error status
        raise CheckpointError(f"{constants.ENDPOINT} refused {repo}/{filename}: {str(error)[:200]}") from None
    if not metadata.etag:
        raise CheckpointError(f"{constants.ENDPOINT} sent no ETag for {repo}/{filename}; is HF_ENDPOINT a Hugging Face hub?")
    return metadata


def check_content(path: Path, etag: str, label: str) -> None:
    """Compare a file with an ETag that is a content hash: sha256 (LFS files) or git's blob sha1 (small files)."""
    if re.fullmatch("[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch("[0-9a-f]{40}", etag):
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        return  # an opaque ETag: the size check of the download is all there is
    print(f"checking {label} against the hub's checksum", flush=True)
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        path.unlink()
        raise CheckpointError(f"{label}: the downloaded bytes do not match the hub's checksum {etag}; "
                              f"the file was removed, run the download again")


def fetch(repo: str, filename: str, destination: Path, revision: str | None = None) -> None:
    """Download one file to `destination`, resuming the partial file an interrupted earlier run left."""
    metadata = hub_metadata(repo, filename, revision)
    assert metadata.etag is not None  # hub_metadata refuses an answer without one
    partial = destination.with_name(f"{destination.name}.{re.sub('[^0-9A-Za-z]', '', metadata.etag)[:16]}.part")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(destination.with_name(destination.name + ".lock")):  # one downloader per file, across workers
        if destination.is_file():  # another process finished it while this one waited
            return
        for stale in destination.parent.glob(f"{destination.name}.*.part"):
            if stale != partial:  # left by a download of another version of the file
                stale.unlink()
        done = partial.stat().st_size if partial.is_file() else 0
        if metadata.size is not None and done > metadata.size:
            partial.unlink()
            done = 0
        headers = build_hf_headers()
        if urlparse(metadata.location).netloc != urlparse(constants.ENDPOINT).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
        print(f"downloading {repo}/{filename} -> {destination}" + (f", resuming at byte {done}" if done else ""),
              flush=True)
        try:
            with partial.open("ab") as file:
                http_get(metadata.location, file, resume_size=done, headers=headers,
                         expected_size=metadata.size, displayed_filename=filename)
        except (httpx2.HTTPError, OSError) as error:
            kept = partial.stat().st_size if partial.is_file() else 0
            raise CheckpointError(f"download of {repo}/{filename} stopped ({type(error).__name__}: {str(error)[:200]}); "
                                  f"{kept} bytes are kept in {partial}: run the download again to resume") from None
        check_content(partial, metadata.etag, f"{repo}/{filename}")
        os.replace(partial, destination)


def download(name: str) -> None:
    """Fetch the missing files of a model, then verify all of them."""
    if name == RIFE_WEIGHTS.name:
        download_rife()
        return
    model_type, variant = split_weight_set(name)
    for path in loader.model_files(model_type, variant).missing():
        fetch(card(model_type).hf_repo, path.name, path)
    verify(model_type, variant)
    print(f"{name}: all files present and verified", flush=True)


def download_rife() -> None:
    """Fetch the RIFE checkpoint (frame interpolation) at its pinned commit unless present, then verify it."""
    path = interpolation.checkpoint_path()
    if not path.is_file():
        fetch(RIFE_WEIGHTS.hf_repo, RIFE_WEIGHTS.filename, path, revision=RIFE_WEIGHTS.revision)
    verify_rife()
    print(f"{RIFE_WEIGHTS.name}: {path} present and verified", flush=True)


# Verify
def verify_rife() -> None:
    """The RIFE checkpoint has exactly IFNet's keys and shapes, and is the pinned file (its sha256)."""
    path = interpolation.checkpoint_path()
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: run `python -m seedvr.weights download --model {RIFE_WEIGHTS.name}`")
    with torch.device("meta"):
        check_checkpoint(IFNet(), path)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != RIFE_WEIGHTS.sha256:
        raise CheckpointError(f"{path} has IFNet's keys and shapes but is not the released file {RIFE_WEIGHTS.hf_repo}/"
                              f"{RIFE_WEIGHTS.filename}@{RIFE_WEIGHTS.revision[:7]} (sha256 {digest.hexdigest()}, "
                              f"expected {RIFE_WEIGHTS.sha256}): delete it and download it again")


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a checkpoint, read without loading its tensors (the .safetensors header, a mapped .pth)."""
    if path.suffix != ".safetensors":
        return state_dict_shapes(read_state_dict(path))
    try:
        with safe_open(path, framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {error}") from None


def check_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Raise naming the file and the keys unless the checkpoint has exactly the model's keys and shapes."""
    shapes = checkpoint_shapes(path)
    if isinstance(model, VideoAutoencoder):
        shapes = convert_legacy_vae_keys(shapes)
    mismatches = compare_shapes(state_dict_shapes(model), shapes)
    if mismatches:
        raise CheckpointError(describe_mismatches(mismatches, str(path)))


def verify(model_type: str, variant: str) -> None:
    """Check every file of a model: checkpoints (the converted ones where present) and embeddings."""
    config = loader.load_config(model_type)
    files = loader.check_files(model_type, variant)
    dit, vae = loader.build_models(model_type, config)
    check_checkpoint(dit, files.dit)
    check_checkpoint(vae, files.vae)
    for path in (files.positive_embedding, files.negative_embedding):
        loader.load_embedding(path, config.dit.kwargs.txt_in_dim)


# Convert
def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                      metadata: dict[str, str]) -> None:
    """Write each tensor cast to dtypes[key], one at a time (memory: the largest tensor); the file appears whole."""
    header: dict[str, Mapping[str, object]] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * dtypes[key].itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtypes[key]], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, tensor in tensors.items():
            file.write(tensor.to(dtypes[key]).contiguous().reshape(-1).view(torch.uint8).numpy().data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def converted_dtypes(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """DiT: Linear weights and biases bf16, the rest as stored (fp32: modulation, norms, rope freqs). VAE: all bf16."""
    if isinstance(model, VideoAutoencoder):
        bf16_keys = set(state_dict)
    else:
        bf16_keys = {f"{name}.{kind}" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                     for kind in ("weight", "bias") if getattr(module, kind) is not None}
    return {key: torch.bfloat16 if key in bf16_keys and tensor.is_floating_point() else tensor.dtype
            for key, tensor in state_dict.items()}


def convert(name: str, delete_pth: bool = False) -> None:
    """Write the bf16 .safetensors of a model's checkpoints (skipping those already converted), then verify."""
    model_type, variant = split_weight_set(name)
    dit, vae = loader.build_models(model_type, loader.load_config(model_type))
    dit_source, vae_source = loader.checkpoint_paths(model_type, variant)
    for model, source in ((dit, dit_source), (vae, vae_source)):
        target = source.with_suffix(".safetensors")
        if target.is_file():
            print(f"{target} exists, kept", flush=True)
        else:
            check_checkpoint(model, source)
            state_dict = read_state_dict(source)
            print(f"converting {source} -> {target}", flush=True)
            write_safetensors(target, state_dict, converted_dtypes(model, state_dict),
                              {"format": "pt", "converted_from": source.name})
        check_checkpoint(model, target)
        if delete_pth and source.is_file():
            source.unlink()
            print(f"deleted {source}", flush=True)
    verify(model_type, variant)
    print(f"{name}: converted and verified", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedvr.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("download", "verify", "convert"))
    parser.add_argument("--model", required=True, choices=(*WEIGHT_SETS, RIFE_WEIGHTS.name))
    parser.add_argument("--delete-pth", action="store_true", help="convert: delete each .pth once its copy is verified")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.model)
        elif args.model == RIFE_WEIGHTS.name:  # convert too only verifies: the file is safetensors already
            verify_rife()
            print(f"{args.model}: present and verified" + (", nothing to convert" if args.command == "convert" else ""),
                  flush=True)
        elif args.command == "convert":
            convert(args.model, args.delete_pth)
        else:
            verify(*split_weight_set(args.model))
            print(f"{args.model}: all files present and verified", flush=True)
    except RestoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
