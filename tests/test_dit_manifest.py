"""Full-size DiTs, built on the meta device from the repo configs, against the official checkpoint manifests."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seedvr.models.dit3b import NaDiT3B
from seedvr.models.dit7b import NaDiT7B

REPO_ROOT = Path(__file__).resolve().parent.parent

FULL_SIZE = {  # class, config, manifest, entries, parameters (reference README)
    "3b": (NaDiT3B, "configs_3b", "dit_3b", 635, 3_391_475_776),
    "7b": (NaDiT7B, "configs_7b", "dit_7b", 1128, 8_239_607_872),
}


def read_manifest(path):
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return {key: tuple(int(n) for n in shape.split("x")) for key, shape, _dtype, _numel in rows}


def build_full_size(config_dir, cls):
    kwargs = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / config_dir / "main.yaml").dit.kwargs)
    with torch.device("meta"):
        return cls(**kwargs)


@pytest.mark.parametrize("size", FULL_SIZE)
def test_state_dict_matches_manifest(reference, size):
    cls, config_dir, manifest, entries, parameters = FULL_SIZE[size]
    model = build_full_size(config_dir, cls)
    expected = read_manifest(reference / "manifests" / f"{manifest}.tsv")
    got = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert len(expected) == entries
    assert sorted(set(got) ^ set(expected)) == []
    assert {key: shape for key, shape in got.items() if expected[key] != shape} == {}
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("size", FULL_SIZE)
def test_only_rope_freqs_are_buffers(size):
    cls, config_dir, *_ = FULL_SIZE[size]
    model = build_full_size(config_dir, cls)
    buffers = dict(model.named_buffers())
    assert buffers and all(key.endswith("attn.rope.rope.freqs") for key in buffers)
    assert all(buffer.dtype == torch.float32 for buffer in buffers.values())
    assert set(model.state_dict()) == set(dict(model.named_parameters())) | set(buffers)  # none non-persistent
