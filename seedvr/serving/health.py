"""`health`: what the worker holds and what it can run, answered in milliseconds without loading anything."""

import shutil
import tempfile
from pathlib import Path

import torch

from seedvr import settings
from seedvr.engine import loader
from seedvr.engine.upscaler import available_upscalers
from seedvr.models.attention import available_backends
from seedvr.models.registry import MODELS
from seedvr.serving.model_holder import ModelHolder


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"cuda_available": False, "gpu_memory": 0, "gpu_name": None, "gpu_free_memory": 0, "gpu_count": 0}
    free, total = torch.cuda.mem_get_info()
    return {"cuda_available": True, "gpu_memory": total, "gpu_name": torch.cuda.get_device_name(),
            "gpu_free_memory": free, "gpu_count": torch.cuda.device_count()}


def weight_files() -> dict[str, bool]:
    """Which weight files are present, per model; never opens them."""
    present = {}
    for model in MODELS.values():
        for variant in model.variants:
            files = loader.model_files(model.model_type, variant)
            present.update({str(path): path.is_file() for path in files.all()})
    return present


def disk_space(folder: Path) -> dict:
    """Free and total bytes of the disk holding `folder` (its nearest existing parent)."""
    existing = next((path for path in (folder, *folder.parents) if path.exists()), Path("/"))
    usage = shutil.disk_usage(existing)
    return {"path": str(folder), "free_bytes": usage.free, "total_bytes": usage.total}


def health(holder: ModelHolder) -> dict:
    worker = settings.current()
    return {
        "status": "healthy",
        **holder.describe(),
        **gpu_facts(),
        "disk": {"temporary": disk_space(Path(tempfile.gettempdir())), "weights": disk_space(worker.ckpt_dir)},
        "weights": weight_files(),
        "upscalers": sorted(available_upscalers()),  # the names model_type "upscaler" and fallback_upscaler take
        "attention_backends": available_backends(),
        "settings": settings.current().public(),
    }
