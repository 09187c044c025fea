"""hnmix.train, SIGKILLed in the middle of its second checkpoint save (a fault injected here, not
in the library): model.safetensors is half written when the process dies."""

import os
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from hnmix.train.loop import main

real_save_state = Accelerator.save_state
saves = 0


def save_state_then_die(self, output_dir=None, **kwargs):
    global saves
    saves += 1
    if saves == 2:
        (Path(output_dir) / "model.safetensors").write_bytes(b"half of a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_state(self, output_dir, **kwargs)


if __name__ == "__main__":
    Accelerator.save_state = save_state_then_die
    sys.exit(main(sys.argv[1:]))
