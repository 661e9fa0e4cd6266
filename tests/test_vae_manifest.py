"""The VAE's state dict matches the official checkpoint layout (vae.tsv) and the
golden weights load strictly, with current or legacy attention key names."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from seedvr.models.vae import VideoAutoencoder, convert_legacy_vae_keys

REPO = Path(__file__).resolve().parent.parent
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def vae_golden(golden):
    return golden / "vae_tiny"


@pytest.fixture(scope="module")
def tiny_kwargs(vae_golden):
    return json.loads((vae_golden / "meta.json").read_text())["config"]["kwargs"]


def _manifest(reference) -> dict[str, tuple[int, ...]]:
    rows = (reference / "manifests" / "vae.tsv").read_text().splitlines()[1:]
    return {key: tuple(int(d) for d in shape.split("x")) for key, shape, *_ in (row.split("\t") for row in rows)}


@pytest.mark.parametrize("config", ["configs_3b", "configs_7b"])
def test_full_size_state_dict_equals_official_manifest(reference, config):
    kwargs = OmegaConf.to_container(OmegaConf.load(REPO / config / "main.yaml").vae.kwargs)
    with torch.device("meta"):
        vae = VideoAutoencoder(**kwargs)
    ours = {key: tuple(value.shape) for key, value in vae.state_dict().items()}
    manifest = _manifest(reference)
    assert len(manifest) == 250
    assert sorted(set(manifest) - set(ours)) == []  # missing from our model
    assert sorted(set(ours) - set(manifest)) == []  # ours only
    assert {key: shape for key, shape in ours.items() if manifest[key] != shape} == {}


def test_golden_weights_load_strictly(vae_golden, tiny_kwargs):
    state = load_file(vae_golden / "weights.safetensors")
    vae = VideoAutoencoder(**tiny_kwargs)
    vae.load_state_dict(state, strict=True)
    for key, value in vae.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_golden_pth_weights_equal_safetensors_and_load_strictly(vae_golden, tiny_kwargs):
    state = torch.load(vae_golden / "weights.pth", map_location="cpu", weights_only=True)
    safetensors_state = load_file(vae_golden / "weights.safetensors")
    assert state.keys() == safetensors_state.keys()
    assert all(torch.equal(state[key], safetensors_state[key]) for key in safetensors_state)
    VideoAutoencoder(**tiny_kwargs).load_state_dict(convert_legacy_vae_keys(state), strict=True)


def test_legacy_attention_names_load_after_conversion(vae_golden, tiny_kwargs):
    state = load_file(vae_golden / "weights.safetensors")
    legacy = {}
    for key, value in state.items():
        for new, old in LEGACY_NAMES.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert sum(".attentions.0.query." in key for key in legacy) == 4  # encoder + decoder, weight + bias

    vae = VideoAutoencoder(**tiny_kwargs)
    with pytest.raises(RuntimeError, match="query"):
        vae.load_state_dict(legacy, strict=True)

    converted = convert_legacy_vae_keys(legacy)
    assert converted.keys() == state.keys()
    vae.load_state_dict(converted, strict=True)
    for key, value in vae.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_legacy_conversion_refuses_a_key_under_both_names():
    weight = torch.zeros(2, 2)
    state = {
        "encoder.mid_block.attentions.0.query.weight": weight,
        "encoder.mid_block.attentions.0.to_q.weight": weight,
    }
    with pytest.raises(ValueError, match="both"):
        convert_legacy_vae_keys(state)
