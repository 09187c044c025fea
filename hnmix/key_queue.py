"""MoCo's queue of past keys: a ring buffer with the dataset id and label of every key."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def validate_queue_size(queue_size: int, global_batch: int) -> None:
    if global_batch < 1 or queue_size % global_batch:
        raise ValueError(
            f"k_moco={queue_size} must be a multiple of the global batch {global_batch} "
            f"(batch_size x processes); try k_moco={max(1, queue_size // max(global_batch, 1)) * global_batch}"
        )


class KeyQueue(nn.Module):
    """A ring buffer of past keys with their dataset ids and labels.

    Buffers (all in the state dict, so a resumed run continues exactly):
      keys:   [K, d] float32, L2-normalised; starts as random unit vectors, as in MoCo.
      ids:    [K] int64 dataset index of each key, -1 for a slot never written.
      labels: [K] int64 class of each key, -1 when unknown.
      ptr:    [] int64 next slot to write.
    The initial keys come from a fixed generator, so every rank starts from the same queue.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        init = torch.randn(size, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("keys", F.normalize(init, dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._constants: dict[tuple, torch.Tensor] = {}  # never written, so made once per size and device

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def _offsets(self, count: int) -> torch.Tensor:
        """[count] int64 0, 1, ..., count - 1 on the buffers' device, made once (a constant)."""
        key = (count, self.ptr.device)
        if key not in self._constants:
            self._constants[key] = torch.arange(count, device=self.ptr.device)
        return self._constants[key]

    def fingerprint(self) -> str:
        """SHA-256 of all four buffers: equal on every rank, unchanged by a save and load."""
        digest = hashlib.sha256()
        for buffer in (self.keys, self.ids, self.labels, self.ptr):
            digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                apply: Optional[torch.Tensor] = None) -> None:
        """Write a global batch: keys [G, d], ids [G], labels [G] or None. K % G must be 0.

        apply: [] bool or None (always). Where False the queue stays exactly as it was (a skipped
        step's keys may be NaN), decided on the device. Index arithmetic stays on the device too,
        so there is no host synchronisation.
        """
        G = keys.shape[0]
        validate_queue_size(self.size, G)
        # The modulo: a run resumed on another number of processes may start mid-block.
        slots = torch.add(self._offsets(G), self.ptr).remainder_(self.size)
        if labels is None:
            labels = torch.full_like(self.labels[:G], -1)
        keys, ids, labels = keys.to(self.keys.dtype), ids.to(self.ids.dtype), labels.to(self.labels.dtype)
        if apply is not None:
            keys = torch.where(apply, keys, self.keys[slots])
            ids = torch.where(apply, ids, self.ids[slots])
            labels = torch.where(apply, labels, self.labels[slots])
        self.keys.index_copy_(0, slots, keys)
        self.ids.index_copy_(0, slots, ids)
        self.labels.index_copy_(0, slots, labels)
        self.ptr.add_(G if apply is None else apply, alpha=1 if apply is None else G).remainder_(self.size)
