"""Pictures of a run (part of the sharing layer): `curves` (`python -m hnmix.plot`, dir_out/curves.png),
`views` (`python -m hnmix.preview`), `hardness` (`python -m hnmix.analyze`).

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so drawing
touches no global state and works in any thread or process.
"""
