"""Benchmarks (`python -m hnmix.bench COMMAND`): one module per benchmark, `cli` for the command
line, `system` for what they measure with. Training code never imports this package."""
