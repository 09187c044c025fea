#!/usr/bin/env bash
# Mutation testing of the method layer (hnmix/mixing.py, hnmix/moco.py) and the probes
# (hnmix/evaluate/probes.py, hnmix/evaluate/monitor.py) against their fast tests, with mutmut.
# The modules and the test selection are in pyproject.toml, [tool.mutmut]; see TESTING.md.
#
#   pip install -r requirements-dev.txt
#   tools/mutation.sh                     # a fresh run of every mutant (~23 min on 2 cores), then the summary
#   tools/mutation.sh --resume            # go on from mutants/ (after an interruption or a test change)
#   tools/mutation.sh 'hnmix.moco.x_unwrap*'   # only these mutants (mutmut's name patterns)
#   tools/mutation.sh --summary           # the summary of the last run only
#
# MUTATION_CHILDREN (default 2) mutants run at once, each on one thread. Survivors: `mutmut results`,
# `mutmut show NAME`, run in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1  # a mutant that asks the Hub fails at once

summary() {
    python - <<'PY'
"""Per module: mutants, killed (timeouts count: the tests did not let the mutant pass), the ones
tools/mutation-equivalent.txt lists, and the kill rates over all and over the killable ones."""
import collections
import json
import pathlib

from mutmut.stats import status_by_exit_code

listed = {}  # name -> kind
for line in pathlib.Path("tools/mutation-equivalent.txt").read_text().splitlines():
    if line.startswith("hnmix."):
        name, kind = line.split()[:2]
        listed[name] = kind
rows, left = [], []
for meta in sorted(pathlib.Path("mutants").glob("**/*.py.meta")):
    status = {name: status_by_exit_code[code]
              for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()}
    caught = {name for name, s in status.items() if s in ("killed", "timeout")}
    kinds = collections.Counter(listed[name] for name in status if name in listed and name not in caught)
    unchecked = sum(s == "not checked" for s in status.values())
    module = str(meta.relative_to("mutants")).removesuffix(".meta")
    rows.append((module, len(status), len(caught), kinds["equivalent"], kinds["cpu-only"] + kinds["multiprocess"],
                 unchecked))
    left += [f"  {name}  ({s})" for name, s in status.items() if name not in caught and name not in listed]
print(f"{'module':28} {'mutants':>7} {'killed':>6} {'equiv.':>6} {'cpu/mp':>6} {'killed/all':>10} "
      f"{'/non-equiv.':>11} {'/killable':>9}")
for module, total, killed, equivalent, unkillable, unchecked in rows + [("all", *map(sum, list(zip(*rows))[1:]))]:
    note = f"  ({unchecked} not checked)" if unchecked else ""
    print(f"{module:28} {total:7} {killed:6} {equivalent:6} {unkillable:6} {killed / total:10.1%} "
          f"{killed / (total - equivalent):11.1%} {killed / (total - equivalent - unkillable):9.1%}{note}")
print(f"not killed and not in tools/mutation-equivalent.txt: {len(left)}")
print("\n".join(left))
PY
}

case "${1:-}" in
    --summary) summary; exit 0 ;;
    --resume) shift ;;
    *) rm -rf mutants ;;
esac
set +e
# mutmut redraws a progress line per mutant; keep its other lines.
mutmut run --max-children "${MUTATION_CHILDREN:-2}" "$@" 2>&1 | tr '\r' '\n' | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]'
status=${PIPESTATUS[0]}
set -e
summary
exit "$status"
