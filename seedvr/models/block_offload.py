"""DiT block offload: the blocks' weights live in host memory and visit the GPU one block at a time.

Exact (the same values, moved), and slower only by one host-to-device copy of the blocks per DiT call:
with SeedVR2's single step, one copy of the DiT per chunk (3B about 6.7 GB, 7B about 16 GB in bf16),
well under a second per call at PCIe 4 speeds. Host copies are pinned so the copies are asynchronous.
The embeddings and the output head stay on the device. On a CPU device there is nothing to move: the
bookkeeping runs, the tensors stay where they are.

    dit.block_offload = BlockOffload(dit.blocks, device)   # blocks now in host memory
    ...                                                    # dit's forward loads each block in turn
    dit.block_offload.close(); dit.block_offload = None    # every block back on the device
"""

import torch
from torch import nn


class BlockOffload:
    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.device = torch.device(device)
        self.loaded: int | None = None  # the block whose weights are on the device now
        pin = self.device.type == "cuda"
        self.homes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (tensor of the module, its host copy)
        for block in blocks:
            tensors = [*block.parameters(), *block.buffers()]
            homes = [(tensor, tensor.data.to("cpu")) for tensor in tensors]
            if pin:
                homes = [(tensor, host.pin_memory()) for tensor, host in homes]
            for tensor, host in homes:
                tensor.data = host
            self.homes.append(homes)

    def load(self, index: int) -> None:
        """Block `index` onto the device (the previously loaded one goes back to host memory)."""
        if self.loaded == index:
            return
        self.unload()
        for tensor, host in self.homes[index]:
            tensor.data = host.to(self.device, non_blocking=True)
        self.loaded = index

    def unload(self) -> None:
        if self.loaded is not None:
            for tensor, host in self.homes[self.loaded]:
                tensor.data = host  # the device copy is freed with its last reference
            self.loaded = None

    def close(self) -> None:
        """Every block back on the device for good."""
        self.unload()
        for homes in self.homes:
            for tensor, host in homes:
                tensor.data = host.to(self.device)
        self.homes = []
