"""Sequence parallelism: one request split over several processes (one GPU each), SEEDVR2_SPEC 5.

- `SequenceParallel`: a rank's view of its group; the DiT and the VAE take it as `sp=`.
- `TokenShard`: how the DiT splits a token stream (all-to-all around attention).
- `SequenceParallelGroup`: the long-lived worker processes and the driver that sends them jobs.
"""

from seedvr.parallel.comm import SequenceParallel
from seedvr.parallel.group import SequenceParallelError, SequenceParallelGroup
from seedvr.parallel.tokens import TokenShard

__all__ = ["SequenceParallel", "SequenceParallelError", "SequenceParallelGroup", "TokenShard"]
