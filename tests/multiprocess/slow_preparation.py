"""hnmix.train under `accelerate launch` with a collective timeout of 3 s, where preparing the data
on rank 0 takes 8 s (faults injected here, not in the library): the other rank must wait for the
preparation, not time out."""

import os
import sys
import time

import hnmix.train.components as components
from hnmix.train.loop import main

components.COLLECTIVE_TIMEOUT_S = 3
real_load = components.load_image_dataset


def slow_on_rank_0(*args, **kwargs):
    if os.environ.get("RANK") == "0":
        time.sleep(8)  # a first download and preparation, far longer than the collective timeout
    return real_load(*args, **kwargs)


if __name__ == "__main__":
    components.load_image_dataset = slow_on_rank_0
    sys.exit(main(sys.argv[1:]))
