"""Checkpoint reading and strict loading: formats, corrupt files, and errors that name key and shapes."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from seedvr.engine.checkpoint import (
    Mismatch,
    compare_with_manifest,
    load_strict,
    read_manifest,
    read_state_dict,
)
from seedvr.errors import MODEL_NOT_AVAILABLE, CheckpointError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("freqs", torch.arange(5.0))


def tiny_state(**overrides) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(value.shape, generator=generator) for key, value in Tiny().state_dict().items()}
    state.update(overrides)
    return {key: value for key, value in state.items() if value is not None}


def test_pth_and_safetensors_hold_the_same_tensors(golden):
    from_pth = read_state_dict(golden / "dit3b_tiny" / "weights.pth")
    from_safetensors = read_state_dict(golden / "dit3b_tiny" / "weights.safetensors")
    assert from_pth.keys() == from_safetensors.keys() and len(from_pth) > 100
    assert all(torch.equal(from_pth[key], from_safetensors[key]) for key in from_pth)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint_names_the_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(tiny_state(), path)
    else:
        save_file(tiny_state(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}") as error:
        read_state_dict(path)
    assert error.value.code == MODEL_NOT_AVAILABLE


def test_garbage_missing_and_non_dict_files_are_checkpoint_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": tiny_state()}, nested)
    with pytest.raises(CheckpointError, match="not a flat dict of tensors"):
        read_state_dict(nested)


def test_load_strict_assigns_the_checkpoint_tensors():
    state = tiny_state()
    state["proj.weight"] = state["proj.weight"].double()  # assign keeps the checkpoint's dtype
    model = load_strict(Tiny(), state, "tiny.pth")
    assert model.proj.weight.data_ptr() == state["proj.weight"].data_ptr()
    assert model.proj.weight.dtype == torch.float64
    assert torch.equal(model.freqs, state["freqs"])


def test_load_strict_materialises_a_meta_model():
    with torch.device("meta"):
        model = Tiny()
    load_strict(model, tiny_state(), "tiny.pth")
    assert not any(tensor.is_meta for tensor in model.state_dict().values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"norm.bias": None}, "tiny.pth does not match the model (1 missing keys): missing norm.bias (expected shape 4)"),
        ({"extra.weight": torch.ones(2, 2)}, "1 unexpected keys): unexpected extra.weight (shape 2x2)"),
        ({"proj.weight": torch.ones(3, 4)}, "1 mismatched keys): shape of proj.weight: expected 4x3, got 3x4"),
        ({"freqs": None, "proj.bias": torch.ones(5)}, "1 missing, 1 mismatched keys): missing freqs"),
    ],
    ids=["missing", "unexpected", "mismatched", "missing_buffer_and_mismatched"],
)
def test_load_strict_names_key_and_shapes(overrides, message):
    model = Tiny()
    before = model.proj.weight.clone()
    with pytest.raises(CheckpointError) as error:
        load_strict(model, tiny_state(**overrides), "tiny.pth")
    assert message in str(error.value)
    assert torch.equal(model.proj.weight, before)  # nothing was loaded


def test_error_lists_at_most_ten_keys():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))

    with pytest.raises(CheckpointError, match="16 missing keys.*; and 6 more$"):
        load_strict(Wide(), {}, "wide.pth")


def test_read_manifest_parses_shapes(reference):
    manifest = read_manifest(reference / "manifests" / "vae.tsv")
    assert len(manifest) == 250
    assert manifest["decoder.conv_in.weight"] == (512, 16, 3, 3, 3)
    assert manifest["decoder.conv_in.bias"] == (512,)


def test_read_manifest_rejects_other_files(tmp_path):
    path = tmp_path / "not_a_manifest.tsv"
    path.write_text("a\tb\n")
    with pytest.raises(ValueError, match="not a manifest"):
        read_manifest(path)


def test_compare_with_manifest_reports_every_kind_of_mismatch():
    manifest = {key: tuple(value.shape) for key, value in Tiny().state_dict().items()}
    assert compare_with_manifest(Tiny(), manifest) == []
    manifest["proj.weight"] = (4, 4)
    manifest["gone.weight"] = (1,)
    del manifest["norm.weight"]
    assert compare_with_manifest(Tiny(), manifest) == [
        Mismatch("gone.weight", (1,), None),
        Mismatch("norm.weight", None, (4,)),
        Mismatch("proj.weight", (4, 4), (4, 3)),
    ]
