"""The request rules of the classic upscalers (seedvr.engine.upscaler): `upscaler` with model_type "upscaler",
`fallback_upscaler` behind SeedVR2, both naming a file present in ckpts/upscalers/, and no SeedVR2-only field
sent with an upscaler. Rules as seedvr.serving.schema runs them: parameters named after the fields they read
(those with a default may name a field the action lacks), a problem or None."""

from seedvr.engine.restorer import Sampling
from seedvr.engine.upscaler import UPSCALER, absent_upscaler, available_upscalers

DEFAULT = Sampling()


def _present() -> str:
    names = sorted(available_upscalers())
    return f"one of {', '.join(names)}" if names else "none is present (see health)"


def upscaler_goes_with_its_model_type(model_type: str | None, upscaler: str | None,
                                      fallback_upscaler: str | None = None) -> str | None:
    if model_type == UPSCALER and upscaler is None:
        return f"model_type 'upscaler' needs `upscaler`, the name of the upscaler to run: {_present()}"
    if upscaler is not None and model_type != UPSCALER:
        return (f"upscaler is read with model_type 'upscaler' only, got model_type {model_type or 'null'}: send "
                "model_type 'upscaler' to run it, or name it in fallback_upscaler to finish an item SeedVR2 cannot")
    if fallback_upscaler is not None and model_type == UPSCALER:
        return "fallback_upscaler backs SeedVR2 up; model_type 'upscaler' has nothing to fall back from: drop it"
    return None


def upscalers_are_present(upscaler: str | None, fallback_upscaler: str | None = None) -> str | None:
    problems = [problem for name, field in ((upscaler, "upscaler"), (fallback_upscaler, "fallback_upscaler"))
                if name is not None and (problem := absent_upscaler(name, field))]
    return "; ".join(problems) or None


def upscaler_takes_no_seedvr2_fields(
        model_type: str | None, model_variant: str | None = None, sp_size: int | None = None,
        attention_backend: str | None = None, preset: str | None = None, chunk_frames: int | None = None,
        chunk_overlap: int | None = None, vae_tiling: bool | None = None, vae_tile_size: int | None = None,
        dit_offload: bool | None = None, cfg_scale: float = DEFAULT.cfg_scale,
        cfg_rescale: float = DEFAULT.cfg_rescale, sample_steps: int = DEFAULT.sample_steps,
        color_fix: str = DEFAULT.color_fix, cond_noise_scale: float = DEFAULT.cond_noise_scale) -> str | None:
    """An upscaler would ignore these: refused rather than dropped in silence (seed is the one left alone:
    clients send it with every request, and it changes nothing)."""
    if model_type != UPSCALER:
        return None
    given = {"model_variant": model_variant, "sp_size": sp_size, "attention_backend": attention_backend,
             "preset": preset, "chunk_frames": chunk_frames, "chunk_overlap": chunk_overlap, "vae_tiling": vae_tiling,
             "vae_tile_size": vae_tile_size, "dit_offload": dit_offload}
    sent = [name for name, value in given.items() if value is not None]
    sampling = {"cfg_scale": cfg_scale, "cfg_rescale": cfg_rescale, "sample_steps": sample_steps,
                "color_fix": color_fix, "cond_noise_scale": cond_noise_scale}
    sent += [name for name, value in sampling.items() if value != getattr(DEFAULT, name)]
    if not sent:
        return None
    return (f"{', '.join(sent)} appl{'ies' if len(sent) == 1 else 'y'} to SeedVR2 only, not to model_type "
            "'upscaler': leave them out")


RULES = (upscaler_goes_with_its_model_type, upscalers_are_present, upscaler_takes_no_seedvr2_fields)
