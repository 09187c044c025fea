"""hnmix.train under `accelerate launch`, where rank 1 raises in its third step (a fault injected
here, not in the library): the whole job must come down promptly with that error shown."""

import os
import sys

from hnmix import moco
from hnmix.train.loop import main

original_forward = moco.MoCo.forward
calls = 0


def failing_forward(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == 3 and os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return original_forward(self, *args, **kwargs)


if __name__ == "__main__":
    moco.MoCo.forward = failing_forward
    sys.exit(main(sys.argv[1:]))
