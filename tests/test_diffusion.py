"""Schedule, sampler and CFG: algebraic identities, and the official two-step CFG run replayed."""

import pytest
import torch
from safetensors.torch import load_file

from seedvr.engine import diffusion


@pytest.mark.parametrize("steps, expected", [(1, [1000.0]), (2, [1000.0, 500.0]), (4, [1000.0, 750.0, 500.0, 250.0])])
def test_uniform_trailing_timesteps(steps, expected):
    timesteps = diffusion.uniform_trailing_timesteps(steps)
    assert timesteps.dtype == torch.float32 and timesteps.tolist() == expected


@pytest.mark.parametrize("steps", [3, 49, 50])
def test_timesteps_count_equals_steps(steps):
    timesteps = diffusion.uniform_trailing_timesteps(steps)
    assert len(timesteps) == steps
    assert torch.allclose(timesteps.double(), 1000 * (1 - torch.arange(steps).double() / steps), atol=1e-4)
    with pytest.raises(ValueError):
        diffusion.uniform_trailing_timesteps(0)


def test_v_lerp_conversions_invert_the_schedule():
    generator = torch.Generator().manual_seed(0)
    x_0, x_T = torch.randn(2, 50, 16, generator=generator)
    for t in (1000.0, 730.0, 250.0):
        t = torch.tensor(t)
        x_t = diffusion.lerp(x_0, x_T, t)
        v = x_T - x_0
        assert torch.allclose(diffusion.v_lerp_to_x0(v, x_t, t), x_0, atol=1e-5)
        assert torch.allclose(diffusion.v_lerp_to_xT(v, x_t, t), x_T, atol=1e-5)
    assert torch.equal(diffusion.lerp(x_0, x_T, torch.tensor(1000.0)), x_T)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_euler_follows_a_straight_flow_exactly(steps):
    generator = torch.Generator().manual_seed(steps)
    x_0, noise = torch.randn(2, 30, 16, generator=generator)
    calls = []

    def oracle(x_t, t, step):  # the exact velocity of the straight path through x_0 and noise
        calls.append((step, t.item()))
        return noise - x_0

    timesteps = diffusion.uniform_trailing_timesteps(steps)
    assert torch.allclose(diffusion.sample_euler(oracle, noise, timesteps), x_0, atol=1e-5)
    assert calls == [(i, t) for i, t in enumerate(timesteps.tolist())]


def test_one_step_is_noise_minus_velocity_bit_exactly():
    generator = torch.Generator().manual_seed(1)
    noise, v = torch.randn(2, 40, 16, generator=generator)
    x_0 = diffusion.sample_euler(lambda x, t, step: v, noise, diffusion.uniform_trailing_timesteps(1))
    assert torch.equal(x_0, noise - v)


def test_bf16_velocity_gives_float32_x0_computed_in_float32():
    generator = torch.Generator().manual_seed(2)
    x_t = torch.randn(40, 16, generator=generator)
    v = torch.randn(40, 16, generator=generator).bfloat16()
    x_0 = diffusion.sample_euler(lambda x, t, step: v, x_t, torch.tensor([300.0]))
    assert x_0.dtype == torch.float32
    assert torch.equal(x_0, (x_t - torch.tensor(0.3) * v.float()) / (torch.tensor(0.7) + torch.tensor(0.3)))


def test_guided_velocity_skips_negative_at_scale_one():
    def negative(x_t, t, step):
        raise AssertionError("the negative branch must not run at cfg scale 1")

    def positive(x_t, t, step):
        return x_t * 2

    velocity = diffusion.guided_velocity(positive, negative, 1.0)
    assert torch.equal(velocity(torch.ones(3, 2), torch.tensor(1000.0), 0), torch.full((3, 2), 2.0))


def test_classifier_free_guidance_and_rescale():
    generator = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(2, 20, 16, generator=generator)
    assert torch.allclose(diffusion.classifier_free_guidance(pos, neg, 3.0), 3 * pos - 2 * neg, atol=1e-5)
    full = diffusion.classifier_free_guidance(pos, neg, 3.0, rescale=1.0)
    assert torch.allclose(full.std(dim=1), pos.std(dim=1), atol=1e-5)  # per token, as std(pos)
    half = diffusion.classifier_free_guidance(pos, neg, 3.0, rescale=0.5)
    cfg = 3 * pos - 2 * neg
    factor = 0.5 * pos.std(dim=1, keepdim=True) / cfg.std(dim=1, keepdim=True) + 0.5
    assert torch.allclose(half, cfg * factor, atol=1e-5)


def test_replays_official_two_step_cfg_run(golden):
    """video_cfg2_steps2: cfg 2, timesteps 1000, 500; DiT calls pos, neg, pos, neg with recorded outputs."""
    run = load_file(golden / "pipeline_tiny" / "video_cfg2_steps2.safetensors")
    inputs_seen = []

    def replay(index):
        def velocity(x_t, t, step):
            call = 2 * step + index
            inputs_seen.append((call, x_t.clone(), t.item()))
            return run[f"dit{call}_out"]
        return velocity

    velocity = diffusion.guided_velocity(replay(0), replay(1), 2.0)
    noise = run["noise"].flatten(0, 2)
    x_0 = diffusion.sample_euler(velocity, noise, diffusion.uniform_trailing_timesteps(2))
    assert [(call, t) for call, _, t in inputs_seen] == [(0, 1000.0), (1, 1000.0), (2, 500.0), (3, 500.0)]
    for call, x_t, _ in inputs_seen:
        error = (x_t - run[f"dit{call}_vid"][:, :16]).abs().max().item()
        assert error <= 1e-6, f"x_t of DiT call {call} off by {error}"
    error = (x_0 - run["sample_latent"].flatten(0, 2)).abs().max().item()
    print(f"sample_latent: max abs error {error:.3e}")
    assert error <= 1e-6
