"""Rectified-flow sampling as SeedVR2 uses it: lerp schedule, v_lerp prediction, Euler steps, CFG.

Schedule (T = 1000): x_t = A(t)·x_0 + B(t)·x_T with A = 1 − t/T, B = t/T; x_T is the noise.
The model predicts v ≈ x_T − x_0. One step (the SeedVR2 setting) is a single call at t = T: x_0 = x_T − v.
"""

from collections.abc import Callable

import torch

T = 1000.0  # schedule length; timesteps are floats in (0, T]

# velocity(x_t, t, step) -> v, with x_t (l, c), t a 0-d float tensor and step the 0-based step index
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def signal_coefficient(t: torch.Tensor) -> torch.Tensor:
    """A(t) = 1 − t/T."""
    return 1 - t / T


def noise_coefficient(t: torch.Tensor) -> torch.Tensor:
    """B(t) = t/T."""
    return t / T


def lerp(x_0: torch.Tensor, x_T: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = A(t)·x_0 + B(t)·x_T."""
    return signal_coefficient(t) * x_0 + noise_coefficient(t) * x_T


def v_lerp_to_x0(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − B·v) / (A + B)."""
    a, b = signal_coefficient(t), noise_coefficient(t)
    return (x_t - b * v) / (a + b)


def v_lerp_to_xT(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂_T = (x_t + A·v) / (A + B)."""
    a, b = signal_coefficient(t), noise_coefficient(t)
    return (x_t + a * v) / (a + b)


def uniform_trailing_timesteps(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps,) float32: T, T·(1 − 1/steps), …, T/steps. Never shifted in SeedVR2."""
    if steps < 1:
        raise ValueError(f"sample_steps must be at least 1, got {steps}")
    # The official arange expression, for bit-equal values; float error gives it one extra, near-zero
    # entry for some step counts (e.g. 49), which the slice drops.
    return (torch.arange(1.0, 0.0, -1.0 / steps, device=device) * T)[:steps]


def euler_step(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """From t to s < t along the predicted straight line: x_s = A(s)·x̂_0 + B(s)·x̂_T."""
    return lerp(v_lerp_to_x0(v, x_t, t), v_lerp_to_xT(v, x_t, t), s)


def sample_euler(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Euler sampler over descending timesteps; the last call returns x̂_0 directly.

    noise: x_T (l, c). Returns x̂_0 in the promoted dtype of x_t and v (float32 for a float32 x_T).
    """
    x = noise
    for step, (t, s) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x = euler_step(velocity(x, t, step), x, _like_dims(t, x), _like_dims(s, x))
    t = timesteps[-1]
    return v_lerp_to_x0(velocity(x, t, len(timesteps) - 1), x, _like_dims(t, x))


def _like_dims(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with trailing unit dims up to x.ndim. A 0-d t would not take part in dtype promotion, so B·v of a
    bf16 v would be computed in bf16; with real dims it is float32, as in the official sampler."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def classifier_free_guidance(pos: torch.Tensor, neg: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """neg + scale·(pos − neg); rescale blends in std(pos)/std(cfg) per token (std over all dims but the first)."""
    guided = neg + scale * (pos - neg)
    if rescale != 0.0:
        dims = list(range(1, pos.ndim))
        ratio = pos.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided *= rescale * ratio + (1 - rescale)
    return guided


def guided_velocity(positive: VelocityFn, negative: VelocityFn, scale: float, rescale: float = 0.0) -> VelocityFn:
    """A velocity function with CFG; the negative branch is never called when scale == 1."""
    if scale == 1.0:
        return positive

    def velocity(x_t: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return classifier_free_guidance(positive(x_t, t, step), negative(x_t, t, step), scale, rescale)

    return velocity
