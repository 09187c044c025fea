"""MoCo (He et al.) with MoCHi's hard negative mixing: encoders, queue, shuffle BN, loss.

`MoCo` holds a query encoder (trained), a key encoder (its momentum copy), and a `KeyQueue` of
past keys. One call of `MoCo.forward` encodes both views, the keys on a shuffled batch
(`hnmix.distributed.batch_shuffle`), builds the logits with `hnmix.mixing.mix_logits`, returns
the loss with its step statistics, and enqueues the keys of the whole global batch.
`MoCo.momentum_update` is called once per optimizer step by the trainer.

Several processes: every collective goes through `torch.distributed` when it is initialised
(Accelerate initialises it), so each rank gathers the same global batch of keys and holds an
identical queue. Build the model under the same seed on every rank.
"""

from __future__ import annotations

import copy
import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hnmix.backbones import create_backbone
from hnmix.distributed import all_gather_cat, batch_shuffle, batch_unshuffle, world_size_and_rank
from hnmix.mixing import NEGATIVE_TYPES, MixedLogits, mix_logits, validate_mixing_sizes
from hnmix.key_queue import KeyQueue
from hnmix.split_bn import convert_split_batchnorm, deferred_split_statistics, has_batchnorm


def mixing_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The source of MoCHi's draws (positions and coefficients) at `step` on `rank`: a generator on
    `device` seeded from (seed, step, rank). Independent across ranks and steps, and a resumed run
    draws exactly what the uninterrupted one did, with no generator state to save. Seeding a
    generator is a host-side operation, also on CUDA."""
    generator = torch.Generator(device=device)
    generator.manual_seed(random.Random(f"mixing:{seed}:{step}:{rank}").getrandbits(63))
    return generator


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


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


class MoCo(nn.Module):
    """MoCo v2 with MoCHi hard negative mixing.

    forward(view_q, view_k, ids, labels=None, step=0, enqueue=True) -> (loss, stats)
      view_q, view_k: [B, 3, H, W] the two views of each image.
      ids:            [B] int64 dataset indices (for the queue's duplicate mask).
      labels:         [B] int64 classes or None (only for the false-negative statistic).
      step:           the optimizer step, for the curriculum: each negative type from its
                      start option (type 1 from `start1_hard`, ...); 0 means from the first
                      step. With `seed` it also seeds the mixing draws (`mixing_generator`, per rank).
      loss:           [] float32 cross entropy with target 0, whatever the autocast.
      stats:          dict of detached 0-dim tensors (no host synchronisation), see
                      `step_statistics`.

    enqueue=False leaves the queue as it is and returns a third item, the global batch for
    `queue.enqueue`: (keys [G, d], ids [G], labels [G] or None). The trainer enqueues it after the
    optimizer step, only where the step was not skipped (`hnmix.train.step`). The logits then read
    the queue itself rather than a copy, so the enqueue must come after the backward (autograd
    refuses a backward through a queue written since).

    symmetric=True (MoCo v3, solo-learn's MoCo v2+): each view is also a query against the key
    of the other; the loss and the statistics are the means of the two directions (so the loss
    keeps the scale of the one-directional loss). Both directions score against the same queue,
    and the queue is updated once per image, with the keys of `view_k`: enqueueing both views'
    keys would put two near-identical keys of each image into the queue and halve its reach in
    time. It costs a second forward of both encoders.
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
        bn_splits: int = 1,
        symmetric: bool = False,
        seed: int = 0,
        **mixing: int,
    ) -> None:
        """mixing: each negative type's count per query and first step, by their options
        (`s1_hard=16, start1_hard=5000, ...`); 0 where left out."""
        super().__init__()
        self.counts = {t.count_option: mixing.pop(t.count_option, 0) for t in NEGATIVE_TYPES.values()}
        self.starts = {t.start_option: mixing.pop(t.start_option, 0) for t in NEGATIVE_TYPES.values()}
        if mixing:
            raise TypeError(f"MoCo got unknown options {sorted(mixing)}")
        validate_mixing_sizes(queue_size=k_moco, temperature=t_moco, n_hard=n_hard, **self.counts)
        if not 0.0 <= m_moco <= 1.0:
            raise ValueError(f"m_moco must be in [0, 1], got {m_moco}")
        for name, start in self.starts.items():
            if start < 0:
                raise ValueError(f"{name} must be >= 0, got {start}")
        self.m_moco, self.t_moco, self.n_hard = m_moco, t_moco, n_hard
        self.symmetric, self.seed = symmetric, seed
        self.shuffle_keys = has_batchnorm(encoder_q)
        self.bn_splits = bn_splits
        if bn_splits > 1 and self.shuffle_keys:
            convert_split_batchnorm(encoder_q, bn_splits)
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
        self.queue = KeyQueue(k_moco, dim_moco)
        self._constants: dict[tuple, torch.Tensor] = {}  # never written, so made once per size and device

    def mixing_sizes(self, step: int) -> tuple[int, ...]:
        """The count of each negative type in force at `step` under the curriculum, in the
        registry's order: (s1, s2) for MoCHi's two."""
        return tuple(self.counts[t.count_option] if step >= self.starts[t.start_option] else 0
                     for t in NEGATIVE_TYPES.values())

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
        weight = torch.where(apply, 1.0 - m, 0.0).to(k_params[0].dtype)
        torch._foreach_lerp_(k_params, q_params, [weight] * len(k_params))

    @torch.no_grad()
    def encode_keys(self, view_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of this rank's samples [B, d] and of the global batch [world * B, d], rank order.

        With BatchNorm, the key encoder sees the batch shuffled (`batch_shuffle`: MoCo's shuffle
        BN), so that no BN group holds both views of an image: across ranks, or across the
        `bn_splits` groups of one process. Models without BatchNorm, and one process with one
        group, have nothing to shuffle. Keys are float32, also under autocast.
        """
        if not self.shuffle_keys or (self.bn_splits == 1 and world_size_and_rank()[0] == 1):
            keys = self.encoder_k(view_k)
            return keys, all_gather_cat(keys)
        shuffled, order = batch_shuffle(view_k)
        return batch_unshuffle(self.encoder_k(shuffled), order)

    def forward(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        step: int = 0,
        enqueue: bool = True,
    ) -> tuple:
        with deferred_split_statistics(self.bn_splits > 1):
            q = self.encoder_q(view_q)
            k, keys_all = self.encode_keys(view_k)
            if self.symmetric:
                q_of_k = self.encoder_q(view_k)
                k_of_q, _ = self.encode_keys(view_q)
        # Enqueued here, the queue is written in place below, after the logits saved it for their
        # backward: they get a copy.
        queue_keys = self.queue.keys.clone() if enqueue else self.queue.keys
        sizes = dict(zip((t.size for t in NEGATIVE_TYPES.values()), self.mixing_sizes(step)))
        generator = mixing_generator(self.seed, step, world_size_and_rank()[1], q.device) if any(sizes.values()) else None
        loss, stats = self.contrast(q, k, queue_keys, ids, labels, sizes=sizes, generator=generator)
        if self.symmetric:
            loss_back, stats_back = self.contrast(q_of_k, k_of_q, queue_keys, ids, labels, sizes=sizes,
                                                  generator=generator)
            loss = (loss + loss_back) / 2
            stats = {name: (value + stats_back[name]) / 2 for name, value in stats.items()}
        stats["loss"] = loss.detach()
        batch = (keys_all, all_gather_cat(ids), None if labels is None else all_gather_cat(labels))
        if not enqueue:
            return loss, stats, batch
        self.queue.enqueue(*batch)
        return loss, stats

    def _zeros(self, size: int, device: torch.device) -> torch.Tensor:
        """[size] int64 zeros on `device` (the targets: the positive is class 0), made once."""
        key = (size, device)
        if key not in self._constants or torch.is_inference_mode_enabled():  # autograd saves it
            self._constants[key] = torch.zeros(size, dtype=torch.long, device=device)
        return self._constants[key]

    def contrast(self, q: torch.Tensor, k: torch.Tensor, queue_keys: torch.Tensor, ids: torch.Tensor,
                 labels: Optional[torch.Tensor], *, sizes: dict[str, int],
                 generator: Optional[torch.Generator]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of queries q [B, d] against their keys k [B, d] and `queue_keys` [K, d] with
        `sizes` synthetic negatives each (by type size: s1=, s2=, ...), and its step statistics."""
        mixed = mix_logits(
            q, k, queue_keys, temperature=self.t_moco, n_hard=self.n_hard,
            ids=ids, queue_ids=self.queue.ids, generator=generator, **sizes,
        )
        loss = F.cross_entropy(mixed.logits, self._zeros(q.shape[0], q.device))
        stats = step_statistics(mixed, queue_size=self.queue.size, labels=labels,
                                queue_labels=self.queue.labels, **sizes)
        return loss, stats


@torch.no_grad()
def step_statistics(
    mixed: MixedLogits,
    *,
    queue_size: int,
    labels: Optional[torch.Tensor] = None,
    queue_labels: Optional[torch.Tensor] = None,
    **sizes: int,
) -> dict[str, torch.Tensor]:
    """Statistics of one step from its logits, no extra passes. All 0-dim float32 tensors.

    acc1:                 the positive ranks first among the real (queue) negatives.
    logit_pos:            mean positive logit (divided by the temperature, like all logits).
    logit_hardest:        mean over queries of the highest queue logit.
    logit_<type>:         mean logit of each negative type active in `sizes` (by its size:
                          s1=, s2=, ...), e.g. logit_type1, logit_type2.
    synthetic_above_pos:  fraction of synthetic negatives scoring above the positive.
    hard_false_negative:  fraction of the n_hard hard negatives sharing the query's class (the
                          paper's class-oracle false negatives), among those whose class is known
                          (queue label >= 0), when labels are given.
    """
    logits = mixed.logits
    pos = logits[:, 0]
    hardest = logits[:, 1 : 1 + queue_size].amax(dim=1)
    # A handful of ops whatever the number of statistics: the means in one reduction, the
    # fractions as one division of stacked numerators by stacked denominators (each stack of one
    # dtype, which a GPU concatenates in one kernel).
    names = ["acc1", "logit_pos", "logit_hardest"]
    rows = torch.stack([pos, pos, hardest])
    torch.gt(rows[1], rows[2], out=rows[0])  # 1 where the positive ranks first, 0 elsewhere
    means = rows.mean(dim=1)
    numerators, denominators = [], []
    synthetic = logits[:, 1 + queue_size :]
    if synthetic.numel():
        finite = torch.isfinite(synthetic)
        finite_values = synthetic.where(finite, 0)
        start = 0
        for t in NEGATIVE_TYPES.values():
            block = slice(start, start + sizes.get(t.size, 0))
            start = block.stop
            if finite[:, block].numel():
                names.append(f"logit_{t.name}")
                numerators.append(finite_values[:, block].sum())
                denominators.append(finite[:, block].sum())
        names.append("synthetic_above_pos")
        numerators.append((synthetic > pos.unsqueeze(1)).sum(dtype=means.dtype))  # -inf and NaN never are
        denominators.append(finite.sum())
    if labels is not None and queue_labels is not None and mixed.hard_indices.numel():
        # Over the hard negatives whose class is known: slots not yet filled (or filled from a
        # batch without labels) hold label -1, which says nothing about the class.
        hard_labels = queue_labels[mixed.hard_indices]  # [B, n_hard]
        considered = mixed.hard_valid & (labels.unsqueeze(1) >= 0)
        hard_labels = hard_labels.where(considered, -2)  # -2 matches no label, known or not
        names.append("hard_false_negative")
        numerators.append((hard_labels == labels.unsqueeze(1)).sum(dtype=means.dtype))
        denominators.append((hard_labels >= 0).sum())
    if numerators:
        means = torch.cat([means, torch.stack(numerators) / torch.stack(denominators).clamp_min(1)])
    return dict(zip(names, means.float().unbind()))
