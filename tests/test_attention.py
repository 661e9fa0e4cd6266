"""Varlen attention backends against an independent per-sequence softmax reference."""

import math

import pytest
import torch

from seedvr.models import attention
from seedvr.models.attention import available_backends, resolve_backend, varlen_attention

LENGTHS = [5, 17, 17, 3, 17, 9, 1, 9, 40]  # repeated and unique lengths, a length-1 sequence


def random_varlen(lengths, heads=3, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


def naive_reference(q, k, v, cu_seqlens):
    """softmax(q k^T / sqrt(d)) v for every sequence on its own, in float64."""
    out = []
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:stop].double().transpose(0, 1) for x in (q, k, v))  # (H, n, d)
        weights = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append((weights @ vs).transpose(0, 1))
    return torch.cat(out)


def test_sdpa_matches_per_sequence_softmax():
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    out = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive_reference(q, k, v, cu_seqlens), atol=2e-6, rtol=0)


def test_sdpa_sequences_do_not_leak_into_each_other():
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    base = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[5:22] += 3.0  # sequence 1 only
    v2[5:22] -= 2.0
    changed = varlen_attention(q, k2, v2, cu_seqlens, max(LENGTHS), backend="sdpa")
    assert torch.equal(torch.cat([base[:5], base[22:]]), torch.cat([changed[:5], changed[22:]]))
    assert not torch.allclose(base[5:22], changed[5:22])


def test_sdpa_splits_large_groups_without_changing_results(monkeypatch):
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    whole = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa")
    monkeypatch.setattr(attention, "SDPA_MAX_SCORES", 3 * 17 * 17)  # one length-17 sequence per call
    torch.testing.assert_close(varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa"), whole,
                               atol=1e-6, rtol=0)


def test_bfloat16_inputs_stay_bfloat16_and_close():
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_seqlens, max(LENGTHS), backend="sdpa")
    assert out.dtype == torch.bfloat16
    # bf16 inputs (relative rounding 2^-9) and output: a few 1e-2 at |v| ~ 3.
    torch.testing.assert_close(out.double(), naive_reference(q, k, v, cu_seqlens), atol=5e-2, rtol=0)


def test_auto_resolves_to_an_available_backend():
    assert "sdpa" in available_backends()
    assert resolve_backend("auto") == available_backends()[0]
    assert resolve_backend(None) == resolve_backend("auto")
    assert resolve_backend("sdpa") == "sdpa"


def test_unknown_backend_names_the_valid_choices():
    with pytest.raises(ValueError, match="auto, flash, sdpa"):
        resolve_backend("xformers")


@pytest.mark.skipif("flash" in available_backends(), reason="checks the behaviour without flash-attn/CUDA")
def test_flash_refused_when_unavailable():
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash")
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    with pytest.raises(ValueError, match="flash"):
        varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="flash")
    auto = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="auto")
    assert torch.equal(auto, varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa"))


def test_mismatched_shapes_are_rejected():
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    with pytest.raises(ValueError, match="share one shape"):
        varlen_attention(q, k[:-1], v, cu_seqlens, max(LENGTHS))


def test_auto_keeps_cpu_and_float32_tensors_on_sdpa_even_with_flash_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_flash_varlen_func", lambda: lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends() == ["flash", "sdpa"] and resolve_backend("auto") == "flash"
    q, k, v, cu_seqlens = random_varlen(LENGTHS)
    auto = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="auto")
    assert calls == [] and torch.equal(auto, varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="sdpa"))
    with pytest.raises(ValueError, match="CUDA"):
        varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="flash")
