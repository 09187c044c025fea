"""Pictures of a run (part of the sharing layer), drawn with matplotlib's Agg canvas (no display).

- `curves`: the training curves from a run's metrics.jsonl (`dir_out/curves.png`, `python -m hnmix.plot`).
- `views`: the grid of original images and their two augmented views (`python -m hnmix.preview`).
- `hardness`: the figure of MoCHi's analysis of hardness (`python -m hnmix.analyze`).

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so drawing
touches no global state and works in any thread or process.
"""
