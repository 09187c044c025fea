"""The training layer: `python -m hnmix.train` and `accelerate launch -m hnmix.train`.

- `config`: the options (one dataclass, YAML, validation with one-line errors).
- `components`: the Accelerator, data, model, monitor and Hub pusher of a run, and the checks
  made before any compute.
- `loop`: the training function and `main`.
- `schedule`: the learning-rate schedule. `optim`: the optimizer and the non-finite step guard.
- `checkpoints`: checkpoint directories (atomic saves, retention, `--resume`); `state`: what a
  run saves and restores in them.
- `metrics`: step statistics over a logging window, metrics.jsonl. `preemption`: signals.

The math stays in `hnmix.moco` and `hnmix.mixing`.
"""
