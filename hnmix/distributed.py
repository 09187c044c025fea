"""Collectives of the method: the gathered global batch and MoCo's batch shuffle.

Every collective goes through `torch.distributed` when it is initialised (Accelerate initialises
it); on one process they are the identity or a local permutation, with no process group needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every rank -> [world * B, ...], concatenated in rank order. No gradient."""
    world, _ = world_size_and_rank()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def exchange_dtype(images: torch.Tensor) -> torch.dtype:
    """The dtype `images` cross ranks in: autocast's for their device type when it is on (the
    encoder's first layer casts to it anyway), else their own."""
    device_type = images.device.type
    if images.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return images.dtype


@torch.no_grad()
def batch_shuffle(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's batch shuffle: images [B, ...] on every rank -> (this rank's B images of the global
    batch in a random order, order [world * B] int64), the order drawn from the global RNG and
    broadcast from rank 0, so that one permutation holds everywhere; `batch_unshuffle` undoes it.
    On one process the batch is permuted in place of the ranks (split BatchNorm's shuffle). Under
    autocast the images cross ranks in its dtype (`exchange_dtype`).

    >>> shuffled, order = batch_shuffle(images)  # one process: shuffled == images[order]
    """
    world, rank = world_size_and_rank()
    if world > 1:
        images = all_gather_cat(images.to(exchange_dtype(images)))
    order = torch.randperm(images.shape[0], device=images.device)
    if world > 1:
        dist.broadcast(order, src=0)
    return images[order.view(world, -1)[rank]], order


@torch.no_grad()
def batch_unshuffle(rows: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo `batch_shuffle`: rows [B, ...] computed from this rank's shuffled images -> (this
    rank's rows [B, ...], the global batch's [world * B, ...], rank order), each row back at the
    position of its image. On one process both are the same tensor.

    >>> keys, keys_all = batch_unshuffle(encoder(shuffled), order)  # keys[i] is images[i]'s
    """
    world, rank = world_size_and_rank()
    gathered = all_gather_cat(rows)
    unshuffled = torch.empty_like(gathered)
    unshuffled[order] = gathered
    return (unshuffled if world == 1 else unshuffled.chunk(world)[rank]), unshuffled
