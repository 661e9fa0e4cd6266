"""DiT block offload: the blocks' weights live in host memory and visit the GPU one block at a time.

Exact (the same values, moved), and slower only by one host-to-device copy of the blocks per DiT call:
with SeedVR2's single step, one copy of the DiT per chunk (3B about 6.7 GB, 7B about 16 GB in bf16),
well under a second per call at PCIe 4 speeds. The host copies are pinned once, when offload starts.
On CUDA the copies run on a side stream: loading block i starts copying block i + 1, which then overlaps
block i's compute, and the compute stream waits for a block's copy (an event) only when it needs it.
The embeddings and the output head stay on the device. On a CPU device there is nothing to move: the
bookkeeping runs, the tensors stay where they are.

    dit.block_offload = BlockOffload(dit.blocks, device)   # blocks now in host memory
    ...                                                    # dit's forward loads each block in turn
    dit.block_offload.close(); dit.block_offload = None    # every block back on the device

Memory: the block being computed and the one being copied, as the memory plan counts (two blocks). A freed
device copy returns to the caching allocator only once the compute that read it has run (`record_stream`);
until then the allocator takes fresh memory, or waits for that compute when the device is full.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Copies:
    """One block's device copies, in the order of its homes, and the event that marks them written."""

    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None  # None: copied on the current stream (or nothing to copy, on CPU)


class BlockOffload:
    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.device = torch.device(device)
        self.loaded: int | None = None  # the block whose weights are on the device now
        on_cuda = self.device.type == "cuda"
        self.homes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (tensor of the module, its host copy)
        for block in blocks:
            tensors = [*block.parameters(), *block.buffers()]
            homes = [(tensor, tensor.data.to("cpu")) for tensor in tensors]
            if on_cuda:
                homes = [(tensor, host.pin_memory()) for tensor, host in homes]
            for tensor, host in homes:
                tensor.data = host
            self.homes.append(homes)
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.prefetched: dict[int, _Copies] = {}  # blocks whose copy to the device has been started

    def load(self, index: int) -> None:
        """Block `index` onto the device (the previously loaded one goes back to host memory); on CUDA,
        also start copying block `index + 1`."""
        if self.loaded == index:
            return
        self.unload()
        copies = self.prefetched.pop(index, None) or self._copy(index)
        if copies.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copies.ready)
            for copy in copies.tensors:
                copy.record_stream(stream)  # its memory is not reused before this stream has read it
        for (tensor, _), copy in zip(self.homes[index], copies.tensors):
            tensor.data = copy
        self.loaded = index
        following = index + 1
        if self.copy_stream is not None and following < len(self.homes) and following not in self.prefetched:
            self.prefetched[following] = self._copy(following)

    def _copy(self, index: int) -> _Copies:
        """Start copying block `index` to the device: on the side stream on CUDA; on CPU the host tensors."""
        if self.copy_stream is None:
            return _Copies([host.to(self.device, non_blocking=True) for _, host in self.homes[index]], None)
        with torch.cuda.stream(self.copy_stream):
            tensors = [host.to(self.device, non_blocking=True) for _, host in self.homes[index]]
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return _Copies(tensors, ready)

    def unload(self) -> None:
        if self.loaded is not None:
            for tensor, host in self.homes[self.loaded]:
                tensor.data = host  # the device copy is freed with its last reference
            self.loaded = None

    def close(self) -> None:
        """Every block back on the device for good."""
        self.unload()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy still writes into memory about to be dropped
        self.prefetched = {}
        for homes in self.homes:
            for tensor, host in homes:
                tensor.data = host.to(self.device)
        self.homes = []
