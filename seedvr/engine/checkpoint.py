"""Reading checkpoints and loading them strictly, with errors that name the file, the key and the shapes.

The official loader takes the .pth as it is (no renaming, no prefix stripping) and loads the DiT with
strict=True, assign=True; we do the same for every model, after checking keys and shapes ourselves.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from seedvr.errors import CheckpointError

MAX_LISTED_KEYS = 10  # per kind of mismatch in an error message

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class Mismatch:
    """One key whose presence or shape differs; a None shape means the key is absent on that side."""

    key: str
    expected: tuple[int, ...] | None
    actual: tuple[int, ...] | None

    def __str__(self) -> str:
        if self.actual is None:
            assert self.expected is not None  # compare_shapes never builds a key absent on both sides
            return f"missing {self.key} (expected shape {_shape(self.expected)})"
        if self.expected is None:
            return f"unexpected {self.key} (shape {_shape(self.actual)})"
        return f"shape of {self.key}: expected {_shape(self.expected)}, got {_shape(self.actual)}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from a .safetensors or a torch.save'd .pth/.pt file, on CPU (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CheckpointError(f"checkpoint {path} is not a flat dict of tensors")
    return state_dict


def compare_shapes(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]) -> list[Mismatch]:
    """Missing, unexpected and differently shaped keys of `actual` against `expected`, sorted by key."""
    mismatches = [Mismatch(key, shape, actual.get(key)) for key, shape in expected.items() if actual.get(key) != shape]
    mismatches += [Mismatch(key, None, shape) for key, shape in actual.items() if key not in expected]
    return sorted(mismatches, key=lambda mismatch: mismatch.key)


def state_dict_shapes(state: nn.Module | dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a module's state dict (meta-device modules work) or of a loaded state dict."""
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def describe_mismatches(mismatches: list[Mismatch], source: str) -> str:
    counts = {
        kind: sum(1 for m in mismatches if test(m))
        for kind, test in (
            ("missing", lambda m: m.actual is None),
            ("unexpected", lambda m: m.expected is None),
            ("mismatched", lambda m: m.actual is not None and m.expected is not None),
        )
    }
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
    listed = "; ".join(map(str, mismatches[:MAX_LISTED_KEYS]))
    more = f"; and {len(mismatches) - MAX_LISTED_KEYS} more" if len(mismatches) > MAX_LISTED_KEYS else ""
    return f"{source} does not match the model ({summary} keys): {listed}{more}"


def load_strict(model: ModuleT, state_dict: dict[str, torch.Tensor], source: str | Path) -> ModuleT:
    """Load every key exactly (strict, assign: parameters take the checkpoint's tensors and dtypes).

    A model's own load-time checks (a ValueError from a load hook, e.g. the DiT's rope frequencies) become a
    CheckpointError naming the file."""
    mismatches = compare_shapes(state_dict_shapes(model), state_dict_shapes(state_dict))
    if mismatches:
        raise CheckpointError(describe_mismatches(mismatches, str(source)))
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    return model


def read_manifest(tsv_path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a manifest TSV with the columns key, shape (like 2560x5120), dtype, numel."""
    manifest = {}
    lines = Path(tsv_path).read_text().splitlines()
    if not lines or lines[0].split("\t")[:2] != ["key", "shape"]:
        raise ValueError(f"{tsv_path} is not a manifest (expected a header 'key<TAB>shape<TAB>...')")
    for line in lines[1:]:
        key, shape = line.split("\t")[:2]
        manifest[key] = tuple(int(size) for size in shape.split("x")) if shape else ()
    return manifest


def compare_with_manifest(model: nn.Module, manifest: dict[str, tuple[int, ...]]) -> list[Mismatch]:
    """How the model's state dict differs from the manifest (empty when every key and shape agree)."""
    return compare_shapes(manifest, state_dict_shapes(model))
