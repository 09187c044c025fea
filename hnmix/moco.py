"""MoCo (He et al.) with MoCHi's hard negative mixing: encoders, queue, shuffle BN, loss.

`MoCo` holds a query encoder (trained), a key encoder (its momentum copy), and a `KeyQueue` of
past keys. One call of `MoCo.forward` encodes both views, builds the logits with
`hnmix.mixing.mix_logits`, returns the loss with its step statistics, and enqueues the keys of
the whole global batch. `MoCo.momentum_update` is called once per optimizer step by the trainer.

Several processes: every collective goes through `torch.distributed` when it is initialised
(Accelerate initialises it), so each rank gathers the same global batch of keys and holds an
identical queue. Build the model under the same seed on every rank.
"""

from __future__ import annotations

import copy
import hashlib
import random
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

from hnmix.backbones import create_backbone
from hnmix.mixing import MixedLogits, mix_logits, validate_mixing_sizes

# ----------------------------------------------------------------------------- distributed


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


def mixing_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The source of MoCHi's draws (positions and coefficients) at `step` on `rank`: a generator on
    `device` seeded from (seed, step, rank). Independent across ranks and steps, and a resumed run
    draws exactly what the uninterrupted one did, with no generator state to save. Seeding a
    generator is a host-side operation, also on CUDA."""
    generator = torch.Generator(device=device)
    generator.manual_seed(random.Random(f"mixing:{seed}:{step}:{rank}").getrandbits(63))
    return generator


def exchange_dtype(images: torch.Tensor) -> torch.dtype:
    """The dtype `images` cross ranks in: autocast's for their device type when it is on (the
    encoder's first layer casts to it anyway), else their own."""
    device_type = images.device.type
    if images.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return images.dtype


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


# ----------------------------------------------------------------------------- encoders


HEADS = ("mlp", "linear")


class MoCoEncoder(nn.Module):
    """A timm backbone and a projection head.

    The backbone is `hnmix.backbones.create_backbone(arch, stem=stem)`, i.e.
    `timm.create_model(arch, num_classes=0)`: pooled features for every timm architecture
    (ResNets, ViTs, ConvNeXts, ...), whatever its classifier was called, so the projection head
    always replaces the classifier; `stem="cifar"` gives a ResNet the small-image stem. Its width
    is timm's `head_hidden_size` (the output of a pre-logits stage such as MobileNetV3's
    conv_head), else `num_features`.

    head: "mlp" (MoCo v2: Linear(width, width), ReLU, Linear(width, dim); state-dict keys
    head.0.*, head.2.*) or "linear" (MoCo v1 and the CIFAR-10 demo: one Linear(width, dim);
    head.weight, head.bias).

    Conv nets run in channels_last memory format (weights and inputs), which oneDNN and cuDNN
    convolve faster; `channels_last=False` turns that off.

    forward(x: [B, 3, H, W]) -> [B, dim] float32, L2-normalised.
    """

    def __init__(self, arch: str, dim: int, *, pretrained: bool = False, channels_last: Optional[bool] = None,
                 stem: str = "default", head: str = "mlp", **timm_kwargs) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone = create_backbone(arch, stem=stem, pretrained=pretrained, **timm_kwargs)
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        if head == "linear":
            self.head = nn.Linear(width, dim)
        else:
            self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        if channels_last is None:
            channels_last = any(isinstance(m, nn.Conv2d) for m in self.backbone.modules())
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images.contiguous(memory_format=self.memory_format))
        return F.normalize(self.head(features).float(), dim=1)


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` [N, C, *spatial] is laid out channels-last (C innermost) and not also contiguous."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _groups_as_channels(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C, *spatial] -> [N / groups, groups * C, *spatial]: channel g * C + c of row i holds
    channel c of sample g * N / groups + i, so group g is the g-th contiguous block of the batch.
    One copy, in `x`'s memory format (a channels-last `x` gives a channels-last result)."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    if _is_channels_last(x):
        by_group = x.movedim(1, -1).reshape(groups, n // groups, *spatial, c).movedim(0, -2)  # [N/g, *spatial, g, C]
        return by_group.reshape(n // groups, *spatial, groups * c).movedim(-1, 1)
    return x.reshape(groups, n // groups, -1).transpose(0, 1).reshape(n // groups, groups * c, *spatial)


def _channels_as_groups(y: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_groups_as_channels`: [N / groups, groups * C, *spatial] -> [N, C, *spatial]."""
    rows, c, spatial = y.shape[0], y.shape[1] // groups, y.shape[2:]
    if _is_channels_last(y):
        by_group = y.movedim(1, -1).reshape(rows, *spatial, groups, c).movedim(-2, 0)  # [g, N/g, *spatial, C]
        return by_group.reshape(rows * groups, *spatial, c).movedim(-1, 1)
    return y.reshape(rows, groups, -1).transpose(0, 1).reshape(rows * groups, c, *spatial)


def _repeat(vector: Optional[torch.Tensor], times: int) -> Optional[torch.Tensor]:
    """[C] -> [times * C], `vector` repeated (one copy; `Tensor.repeat` costs several ops on the CPU); None stays None."""
    return None if vector is None else vector.expand(times, -1).reshape(-1)


def _split_batchnorm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over `num_splits` contiguous groups of the batch, as on that many GPUs.

    Each group is normalised with its own statistics; the running statistics become the mean of
    the groups' updates, and `num_batches_tracked` counts one per call. As the MoCo CIFAR demo's
    SplitBatchNorm (and torch's instance_norm) do, the groups become channels: one `F.batch_norm`
    over x as [N / S, S * C, *spatial] with the weight, bias and running statistics repeated S
    times, where a loop over the groups would cost S times the kernel launches. The demo's
    `x.view(-1, C * S, H, W)` would group samples S apart; reshaping contiguous groups costs one
    copy in and one out. timm's BatchNormAct2d then applies its drop and activation.
    Eval mode, one split, and layers that track no running statistics run the layer's own forward.
    """
    if not self.training or self.num_splits == 1 or not self.track_running_stats:
        return super(type(self), self).forward(x)
    self._check_input_dim(x)
    splits = self.num_splits
    if x.shape[0] % splits:
        raise ValueError(f"bn_splits={splits} must divide the batch size {x.shape[0]}")
    self.num_batches_tracked.add_(1)
    # momentum=None is BatchNorm's cumulative average; like torch's BatchNorm, it reads the count on the host.
    factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    running_mean, running_var = _repeat(self.running_mean, splits), _repeat(self.running_var, splits)
    weight, bias = _repeat(self.weight, splits), _repeat(self.bias, splits)
    grouped = F.batch_norm(_groups_as_channels(x, splits), running_mean, running_var, weight, bias,
                           True, factor, self.eps)
    with torch.no_grad():
        torch.mean(running_mean.view(splits, -1), 0, out=self.running_mean)
        torch.mean(running_var.view(splits, -1), 0, out=self.running_var)
    out = _channels_as_groups(grouped, splits)
    if isinstance(self, BatchNormAct2d):
        out = self.act(self.drop(out))
    return out


_SPLIT_CLASSES: dict[type, type] = {}
# The forwards a split layer replaces: torch's BatchNorm1d/2d/3d and timm's BatchNormAct2d (BatchNorm, drop, act).
_SPLITTABLE_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, BatchNormAct2d.forward)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every BatchNorm of `module` into a split BatchNorm with `num_splits` groups, in place.

    The class of each layer is swapped for a subclass, so parameters, buffers and state-dict keys
    stay as they are and checkpoints load either way. Layers whose forward does more than
    torch's BatchNorm or timm's BatchNormAct2d are refused (ValueError): their extras would be lost.
    """
    if num_splits < 1:
        raise ValueError(f"bn_splits must be >= 1, got {num_splits}")
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            base = next(c for c in type(layer).__mro__ if c not in _SPLIT_CLASSES.values())
            if base.forward not in _SPLITTABLE_FORWARDS:
                raise ValueError(f"bn_splits={num_splits} cannot split {base.__name__} layers, only torch's "
                                 "BatchNorm and timm's BatchNormAct2d; use bn_splits=1 with this model")
            if base not in _SPLIT_CLASSES:
                _SPLIT_CLASSES[base] = type(f"Split{base.__name__}", (base,), {"forward": _split_batchnorm_forward})
            layer.__class__ = _SPLIT_CLASSES[base]
            layer.num_splits = num_splits
    return module


# ----------------------------------------------------------------------------- queue


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

    @property
    def size(self) -> int:
        return self.keys.shape[0]

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
        slots = (self.ptr + torch.arange(G, device=self.ptr.device)) % self.size
        if labels is None:
            labels = torch.full_like(self.labels[:G], -1)
        keys, ids, labels = keys.to(self.keys.dtype), ids.to(self.ids.dtype), labels.to(self.labels.dtype)
        advance = G
        if apply is not None:
            keys = torch.where(apply, keys, self.keys[slots])
            ids = torch.where(apply, ids, self.ids[slots])
            labels = torch.where(apply, labels, self.labels[slots])
            advance = apply.long() * G
        self.keys.index_copy_(0, slots, keys)
        self.ids.index_copy_(0, slots, ids)
        self.labels.index_copy_(0, slots, labels)
        self.ptr.copy_((self.ptr + advance) % self.size)


# ----------------------------------------------------------------------------- MoCo


class MoCo(nn.Module):
    """MoCo v2 with MoCHi hard negative mixing.

    forward(view_q, view_k, ids, labels=None, step=0) -> (loss, stats)
      view_q, view_k: [B, 3, H, W] the two views of each image.
      ids:            [B] int64 dataset indices (for the queue's duplicate mask).
      labels:         [B] int64 classes or None (only for the false-negative statistic).
      step:           the optimizer step, for the curriculum: type 1 from `start1_hard`,
                      type 2 from `start2_hard`; 0 means from the first step. With `seed` it
                      also seeds the mixing draws (`mixing_generator`, per rank).
      loss:           [] float32 cross entropy with target 0, whatever the autocast.
      stats:          dict of detached 0-dim tensors (no host synchronisation), see
                      `step_statistics`.

    symmetric=True (MoCo v3, solo-learn's MoCo v2+): each view is also a query against the key
    of the other; the loss and the statistics are the means of the two directions (so the loss
    keeps the scale of the one-directional loss). Both directions score against the same queue,
    and the queue is updated once per image, with the keys of `view_k`: enqueueing both views'
    keys would put two near-identical keys of each image into the queue and halve its reach in
    time. It costs a second forward of both encoders.

    commit=False holds the step's effects back until `commit(keep)`, called after the optimizer
    step: the keys are enqueued, and the BatchNorm running statistics both encoders updated in
    this forward kept, only where `keep` (the step was not skipped); a skipped step's possibly
    non-finite keys and statistics never stay. The trainer runs forward so, under autocast, and
    calls `momentum_update` and `commit` after each optimizer step; commit=True (the default)
    enqueues at once.
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        *,
        dim_moco: int,
        k_moco: int,
        m_moco: float,
        t_moco: float,
        n_hard: int = 0,
        s1_hard: int = 0,
        s2_hard: int = 0,
        start1_hard: int = 0,
        start2_hard: int = 0,
        bn_splits: int = 1,
        symmetric: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        validate_mixing_sizes(queue_size=k_moco, temperature=t_moco, n_hard=n_hard, s1=s1_hard, s2=s2_hard)
        if not 0.0 <= m_moco <= 1.0:
            raise ValueError(f"m_moco must be in [0, 1], got {m_moco}")
        if start1_hard < 0 or start2_hard < 0:
            raise ValueError(f"start1_hard and start2_hard must be >= 0, got {start1_hard}, {start2_hard}")
        self.m_moco, self.t_moco = m_moco, t_moco
        self.n_hard, self.s1_hard, self.s2_hard = n_hard, s1_hard, s2_hard
        self.start1_hard, self.start2_hard = start1_hard, start2_hard
        self.symmetric, self.seed = symmetric, seed
        self.shuffle_keys = has_batchnorm(encoder_q)
        self.bn_splits = bn_splits
        if bn_splits > 1 and self.shuffle_keys:
            convert_split_batchnorm(encoder_q, bn_splits)
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
        self.queue = KeyQueue(k_moco, dim_moco)
        self._held_back: Optional[tuple[tuple, list[torch.Tensor]]] = None  # see commit()

    def mixing_sizes(self, step: int) -> tuple[int, int]:
        """(s1, s2) in force at `step` under the curriculum."""
        s1 = self.s1_hard if step >= self.start1_hard else 0
        s2 = self.s2_hard if step >= self.start2_hard else 0
        return s1, s2

    @torch.no_grad()
    def momentum_update(self, apply: Optional[torch.Tensor] = None, momentum: Optional[float] = None) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * encoder_q, parameters only (BN statistics are
        the key encoder's own, as in MoCo). m is `momentum` when given (a schedule's value for
        this step), else `m_moco`.

        apply: [] bool on the parameters' device, or None (always update). When given, the update
        happens only where it is True, decided on the device without a host synchronisation, so
        that a step the optimizer skipped also leaves the key encoder as it was. The lerp weight
        is then a tensor, (1 - m) or 0: the same arithmetic, one kernel per parameter on CUDA.
        """
        m = self.m_moco if momentum is None else momentum
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in unwrap(self.encoder_q).parameters()]
        if apply is None:
            torch._foreach_lerp_(k_params, q_params, 1.0 - m)
            return
        weight = apply.to(k_params[0].dtype) * (1.0 - m)
        torch._foreach_lerp_(k_params, q_params, [weight] * len(k_params))

    @torch.no_grad()
    def encode_keys(self, view_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of this rank's samples [B, d] and of the global batch [world * B, d], rank order.

        With BatchNorm, keys are encoded on a shuffled batch so that no BN group holds both views
        of an image: across ranks (MoCo's shuffle BN: gather, a permutation broadcast from rank 0,
        each rank encodes its slice, gather, un-shuffle), or within one process when `bn_splits`
        > 1 (each split normalises on its own). Models without BatchNorm skip the shuffle.
        Under autocast the images cross ranks in its dtype (`exchange_dtype`); keys are float32.
        """
        world, rank = world_size_and_rank()
        B = view_k.shape[0]
        if world > 1 and self.shuffle_keys:
            images = all_gather_cat(view_k.to(exchange_dtype(view_k)))
            order = torch.randperm(images.shape[0], device=view_k.device)
            dist.broadcast(order, src=0)
            keys_in_order = all_gather_cat(self.encoder_k(images[order.view(world, B)[rank]]))
            keys_all = torch.empty_like(keys_in_order)
            keys_all[order] = keys_in_order
            return keys_all[rank * B : (rank + 1) * B], keys_all
        if world == 1 and self.shuffle_keys and self.bn_splits > 1:
            order = torch.randperm(B, device=view_k.device)
            keys = torch.empty(B, self.queue.keys.shape[1], device=view_k.device)
            keys[order] = self.encoder_k(view_k[order])
            return keys, keys
        keys = self.encoder_k(view_k)
        return keys, all_gather_cat(keys)

    def forward(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        step: int = 0,
        commit: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        statistics_before = [] if commit else [buffer.clone() for buffer in self.batchnorm_statistics()]
        q = self.encoder_q(view_q)
        k, keys_all = self.encode_keys(view_k)
        # The clone keeps the logits' saved queue intact when enqueue writes in place below.
        queue_keys = self.queue.keys.clone()
        s1, s2 = self.mixing_sizes(step)
        generator = mixing_generator(self.seed, step, world_size_and_rank()[1], q.device) if s1 or s2 else None
        loss, stats = self.contrast(q, k, queue_keys, ids, labels, s1=s1, s2=s2, generator=generator)
        if self.symmetric:
            q_of_k = self.encoder_q(view_k)
            k_of_q, _ = self.encode_keys(view_q)
            loss_back, stats_back = self.contrast(q_of_k, k_of_q, queue_keys, ids, labels, s1=s1, s2=s2,
                                                  generator=generator)
            loss = (loss + loss_back) / 2
            stats = {name: (value + stats_back[name]) / 2 for name, value in stats.items()}
        stats["loss"] = loss.detach()
        batch = (keys_all, all_gather_cat(ids), None if labels is None else all_gather_cat(labels))
        if commit:
            self.queue.enqueue(*batch)
        else:
            self._held_back = (batch, statistics_before)
        return loss, stats

    def batchnorm_statistics(self) -> list[torch.Tensor]:
        """The running statistics buffers of both encoders' BatchNorm layers (a forward in
        training mode updates them)."""
        return [buffer for module in self.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
                if buffer is not None]

    @torch.no_grad()
    def commit(self, keep: torch.Tensor) -> None:
        """Apply what the last `forward(..., commit=False)` held back, where `keep` ([] bool on the
        model's device) is True: enqueue its global batch of keys, and keep the BatchNorm
        statistics it updated; where False, queue and statistics stay as before that forward.
        No host synchronisation."""
        if self._held_back is None:
            raise RuntimeError("commit() without a forward(..., commit=False) before it")
        (keys, ids, labels), before = self._held_back
        self._held_back = None
        self.queue.enqueue(keys, ids, labels, apply=keep)
        for buffer, old in zip(self.batchnorm_statistics(), before):
            buffer.copy_(torch.where(keep, buffer, old))

    def contrast(self, q: torch.Tensor, k: torch.Tensor, queue_keys: torch.Tensor, ids: torch.Tensor,
                 labels: Optional[torch.Tensor], *, s1: int, s2: int,
                 generator: Optional[torch.Generator]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of queries q [B, d] against their keys k [B, d] and `queue_keys` [K, d] with
        s1 + s2 synthetic negatives each, and its step statistics."""
        mixed = mix_logits(
            q, k, queue_keys, temperature=self.t_moco, n_hard=self.n_hard, s1=s1, s2=s2,
            ids=ids, queue_ids=self.queue.ids, generator=generator,
        )
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(mixed.logits, target)
        stats = step_statistics(mixed, queue_size=self.queue.size, s1=s1, s2=s2, labels=labels,
                                queue_labels=self.queue.labels)
        return loss, stats


@torch.no_grad()
def step_statistics(
    mixed: MixedLogits,
    *,
    queue_size: int,
    s1: int,
    s2: int,
    labels: Optional[torch.Tensor] = None,
    queue_labels: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one step from its logits, no extra passes. All 0-dim float32 tensors.

    acc1:                 the positive ranks first among the real (queue) negatives.
    logit_pos:            mean positive logit (divided by the temperature, like all logits).
    logit_hardest:        mean over queries of the highest queue logit.
    logit_type1/2:        mean type-1 / type-2 logit (only while that type is active).
    synthetic_above_pos:  fraction of synthetic negatives scoring above the positive.
    hard_false_negative:  fraction of the n_hard hard negatives sharing the query's class (the
                          paper's class-oracle false negatives), among those whose class is known
                          (queue label >= 0), when labels are given.
    """
    logits = mixed.logits
    pos = logits[:, 0]
    hardest = logits[:, 1 : 1 + queue_size].max(dim=1).values
    stats = {
        "acc1": (pos > hardest).float().mean(),
        "logit_pos": pos.mean(),
        "logit_hardest": hardest.mean(),
    }
    synthetic = logits[:, 1 + queue_size :]
    for name, block in (("logit_type1", synthetic[:, :s1]), ("logit_type2", synthetic[:, s1:])):
        if block.numel():
            finite = torch.isfinite(block)
            stats[name] = block.where(finite, 0).sum() / finite.sum().clamp_min(1)
    if synthetic.numel():
        finite = torch.isfinite(synthetic)
        above = (synthetic > pos.unsqueeze(1)) & finite
        stats["synthetic_above_pos"] = above.sum() / finite.sum().clamp_min(1)
    if labels is not None and queue_labels is not None and mixed.hard_indices.numel():
        # Over the hard negatives whose class is known: slots not yet filled (or filled from a
        # batch without labels) hold label -1, which says nothing about the class.
        hard_labels = queue_labels[mixed.hard_indices]  # [B, n_hard]
        known = mixed.hard_valid & (hard_labels >= 0) & (labels.unsqueeze(1) >= 0)
        same_class = (hard_labels == labels.unsqueeze(1)) & known
        stats["hard_false_negative"] = same_class.sum() / known.sum().clamp_min(1)
    return {name: value.float() for name, value in stats.items()}
