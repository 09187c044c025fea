"""hnmix.train under `accelerate launch`, where every rank also writes RANK_STREAMS_DIR/rank{R}.pt:
the model's state as `build_model` returned it (both encoders and the queue, before `prepare`,
whose DDP broadcast would hide a difference), and a dropout mask and a drop-path mask drawn from
the global RNG at its first training step, as a stochastic layer of the encoder would draw them."""

import os
import sys
from pathlib import Path

import timm.layers
import torch
import torch.nn.functional as F

from hnmix.moco import MoCo
from hnmix.train import loop

record: dict = {}
real_build_model, real_forward = loop.build_model, MoCo.forward


def build_model(*args, **kwargs):
    moco = real_build_model(*args, **kwargs)
    record["initial_state"] = {name: value.detach().clone() for name, value in moco.state_dict().items()}
    return moco


def forward(self, *args, **kwargs):
    if "dropout_mask" not in record:
        record["dropout_mask"] = F.dropout(torch.ones(256), p=0.5, training=True) > 0
        record["drop_path_mask"] = timm.layers.drop_path(torch.ones(64, 1), drop_prob=0.5, training=True) > 0
    return real_forward(self, *args, **kwargs)


if __name__ == "__main__":
    loop.build_model, MoCo.forward = build_model, forward
    code = loop.main(sys.argv[1:])
    torch.save(record, Path(os.environ["RANK_STREAMS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.pt")
    sys.exit(code)
