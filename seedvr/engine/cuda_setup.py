"""Process-wide CUDA settings of the worker: the allocator's configuration and cuDNN's algorithm search.

    set_allocator_defaults()   # at start, before anything touches CUDA (handler.py)
    enable_cudnn_benchmark()   # when a pipeline runs on CUDA (seedvr.engine.pipeline does it)

Expandable segments: the caching allocator maps more physical memory into one growing segment instead of
reserving a new fixed-size segment per large allocation. The VAE allocates activations of a different size at
every resolution, chunk length and tile, and fixed segments fragment under that pattern (reserved memory
growing well past the allocated peak, and OOM with gigabytes "reserved but unallocated"; PyTorch's CUDA
semantics notes on `expandable_segments`). The allocator reads PYTORCH_CUDA_ALLOC_CONF once, when CUDA
initialises, so the variable must be set before that; a value the user set is kept as it is.

cuDNN benchmark: the first convolution of each new shape times cuDNN's algorithms and keeps the fastest
for that shape (the default heuristics pick a slower one for many 3-D shapes). The VAE runs the same few
shapes over and over (every temporal slice of a clip after the first has the same length), so the search
is paid once per shape and resolution.
"""

import logging
import os
from collections.abc import MutableMapping

import torch

log = logging.getLogger(__name__)

ALLOC_CONF_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def set_allocator_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the variable is set already (even to "").

    Returns True when it set the variable. Call it before CUDA initialises: afterwards the allocator has
    read its configuration, so a late call changes nothing and logs a warning.
    """
    environ = os.environ if environ is None else environ
    if ALLOC_CONF_VARIABLE in environ:
        return False
    environ[ALLOC_CONF_VARIABLE] = EXPANDABLE_SEGMENTS
    if environ is os.environ and torch.cuda.is_initialized():
        log.warning("%s=%s set after CUDA was initialised: the allocator keeps the configuration it read at start",
                    ALLOC_CONF_VARIABLE, EXPANDABLE_SEGMENTS)
    return True


def enable_cudnn_benchmark() -> None:
    """cuDNN times its algorithms on the first call of each convolution shape and keeps the fastest."""
    torch.backends.cudnn.benchmark = True
