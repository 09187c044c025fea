"""Run under `accelerate launch --num_processes 2`: a few MoCo steps, then each rank saves what it holds.

Writes OUT/rank{R}.pt with the queue buffers, the ids each rank fed, how many of the images the
key encoder saw on this rank came from the other rank, and the largest difference between the
un-shuffled keys and keys computed without any shuffle (key encoder in eval mode, so a sample's
key does not depend on its batch), the latter also under bf16 autocast with the dtype the images
crossed ranks in; the mixing statistics of one more step on inputs identical on both ranks,
twice from the same queue (only the per-rank mixing draws can tell the ranks apart there); and
what `batch_shuffle` and `batch_unshuffle` alone make of rows that hold their global position.
"""

import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed

from hnmix.distributed import all_gather_cat, batch_shuffle, batch_unshuffle
from hnmix.moco import MoCo, MoCoEncoder

BATCH, QUEUE, DIM, STEPS = 4, 32, 16, 3


def main(out_dir: Path) -> None:
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(0)
    moco = MoCo(MoCoEncoder("test_resnet", DIM), dim_moco=DIM, k_moco=QUEUE, m_moco=0.9, t_moco=0.2,
                n_hard=4, s1_hard=2, s2_hard=2)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(moco, optimizer)
    inner = accelerator.unwrap_model(model)

    seen = []
    inner.encoder_k.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    data = torch.Generator().manual_seed(100 + rank)
    fed_ids, cross_rank_images = [], 0
    for step in range(STEPS):
        view_q = torch.randn(BATCH, 3, 32, 32, generator=data)
        view_k = torch.randn(BATCH, 3, 32, 32, generator=data)
        ids = torch.arange(BATCH) + 1000 * rank + BATCH * step
        labels = ids % 3
        loss, _ = model(view_q, view_k, ids, labels, step=step)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        inner.momentum_update()
        fed_ids.append(ids)
        # Which rank's images did the key encoder see here? Match rows against the gathered batch.
        everyone = all_gather_cat(view_k).flatten(1)
        for row in seen.pop().flatten(1):
            owner = (everyone == row).all(1).nonzero()[0, 0].item() // BATCH
            cross_rank_images += owner != rank

    # Each rank's key encoder kept its own BN running statistics; make them rank 0's so that in
    # eval mode a sample's key is the same whichever rank encodes it.
    for buffer in inner.encoder_k.buffers():
        torch.distributed.broadcast(buffer, src=0)
    inner.encoder_k.eval()
    view_k = torch.randn(BATCH, 3, 32, 32, generator=data)
    with torch.no_grad():
        local, global_keys = inner.encode_keys(view_k)
        reference = inner.encoder_k(view_k)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # images cross ranks in bf16, keys stay float32
            local_bf16, global_bf16 = inner.encode_keys(view_k)
            reference_bf16 = inner.encoder_k(view_k)
    # Identical inputs and queue on both ranks, encoder_q in train mode (its BN normalises with
    # the batch, so its per-rank running statistics play no part).
    same = torch.Generator().manual_seed(7)
    mix_q, mix_k = torch.randn(2, BATCH, 3, 32, 32, generator=same)
    mix_ids = torch.arange(BATCH) + 5000
    queue_before = copy.deepcopy(inner.queue.state_dict())
    with torch.no_grad():
        _, mixing_first = inner(mix_q, mix_k, mix_ids, step=STEPS)
        inner.queue.load_state_dict(queue_before)
        _, mixing_again = inner(mix_q, mix_k, mix_ids, step=STEPS)
    # The shuffle alone, on rows that hold their global position, from a global RNG that differs
    # between the ranks (only rank 0's draw may count).
    torch.manual_seed(rank)
    shuffled, order = batch_shuffle((torch.arange(BATCH) + rank * BATCH).float().unsqueeze(1))
    unshuffled_local, unshuffled_global = batch_unshuffle(10 * shuffled, order)
    torch.save(
        {
            "mixing_first": {name: value.item() for name, value in mixing_first.items()},
            "mixing_again": {name: value.item() for name, value in mixing_again.items()},
            "world": world,
            "shuffle": {"order": order, "rows": shuffled, "local": unshuffled_local, "global": unshuffled_global},
            "queue": {name: buffer.cpu() for name, buffer in queue_before.items()},  # after the training steps
            "fed_ids": torch.cat(fed_ids),
            "cross_rank_images": cross_rank_images,
            "unshuffle_error": (local - reference).abs().max().item(),
            "global_matches_local": torch.equal(global_keys[rank * BATCH : (rank + 1) * BATCH], local),
            "bf16_exchanged_dtype": seen[0].dtype,
            "bf16_key_dtypes": (local_bf16.dtype, global_bf16.dtype),
            "bf16_unshuffle_error": (local_bf16 - reference_bf16).abs().max().item(),
        },
        out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
