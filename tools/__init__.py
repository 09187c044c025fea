"""Developer tools, run from the repository root (`python -m tools.gpu_check`, `python tools/lock.py`);
not part of the hnmix package, and never imported by it."""
