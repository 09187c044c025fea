"""Benchmarks (`python -m hnmix.bench mixing|train|data`): one module per benchmark, `cli` for the
command line, `system` for what they measure with. Training code never imports this package."""
