"""`python -m hnmix.plot DIR_OUT [DIR_OUT ...]`: the training curves (`hnmix.pictures.curves`, the
figure the trainer writes to dir_out/curves.png) of one run, or of several overlaid with a legend
from each run's config.yaml; `--reference NAME` adds a published kNN curve (`hnmix.references`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from hnmix.errors import ConfigError, exit_code
from hnmix.pictures.curves import CURVES_FILE, Run, draw_curves, load_run, run_labels
from hnmix.references import known_references, load_reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.plot",
        description="Training curves (loss, lr, proxy accuracy, kNN, logits, hardness, images/s) of hnmix runs, "
        "from their metrics.jsonl; several runs are overlaid with a legend from their configs.")
    parser.add_argument("dir_out", nargs="+", help="the --dir_out of a training run (holds metrics.jsonl)")
    parser.add_argument("--out", help=f"the PNG to write (default: DIR_OUT/{CURVES_FILE} for one run, "
                        f"./{CURVES_FILE} for several)")
    parser.add_argument("--labels", help="comma-separated legend names, one per run (default: the folder names)")
    parser.add_argument("--reference", metavar="NAME",
                        help="overlay a published kNN top-1 curve on the kNN panel, its epoch n at the end of the "
                        f"first run's epoch n (known: {', '.join(known_references())})")
    return parser


def load_runs(dir_outs: Sequence[str], labels: Optional[str] = None) -> list[Run]:
    """The runs in `dir_outs`, labelled for the legend: the names (`labels`, else the folders),
    with their methods and differing options when there are several."""
    names = [name.strip() for name in labels.split(",")] if labels else [Path(d).resolve().name for d in dir_outs]
    if len(names) != len(dir_outs):
        raise ConfigError(f"option labels names {len(names)} runs but {len(dir_outs)} were given; pass one "
                          "name per DIR_OUT")
    loaded = [load_run(d) for d in dir_outs]
    if len(loaded) > 1:  # one run's title already names its method
        names = run_labels(names, [run.config for run in loaded])
    return [Run(label, run.records, run.config) for label, run in zip(names, loaded)]


def plot(dir_outs: Sequence[str], *, out: Optional[str] = None, labels: Optional[str] = None,
         reference: Optional[str] = None) -> Path:
    """Draw the runs in `dir_outs` (and the published curve `reference`) to one PNG; returns its
    path. Bad arguments are ConfigErrors; an unknown reference is refused before any run is read."""
    published = load_reference(reference) if reference is not None else None
    runs = load_runs(dir_outs, labels)
    path = Path(out) if out else (Path(dir_outs[0]) / CURVES_FILE if len(dir_outs) == 1 else Path(CURVES_FILE))
    if path.suffix.lower() != ".png":
        raise ConfigError(f"option out must name a .png file, got {path}")
    if not path.parent.is_dir():
        raise ConfigError(f"option out: folder {path.parent} does not exist; create it or pass another --out")
    try:
        return draw_curves(runs, path, published)
    except OSError as error:
        raise ConfigError(f"cannot write {path} ({error.strerror or error}); pass another --out") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: print(
        f"wrote {plot(args.dir_out, out=args.out, labels=args.labels, reference=args.reference)}"))


if __name__ == "__main__":
    sys.exit(main())
