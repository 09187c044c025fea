"""The tested set of exact versions, `constraints.txt`, beside the ranges of requirements.txt.

    python tools/lock.py write   # resolve requirements.txt + requirements-dev.txt afresh into constraints.txt
    python tools/lock.py diff    # what a fresh install of requirements.txt would get that the lock does not pin

The README's commands install `-r requirements.txt -c constraints.txt`, and `.ci/run` tests that
set; `diff` is CI's fresh-resolve step: it exits 1 and names every package whose newest allowed
release differs from the lock, and CI then runs the tests on a fresh install too, so a new
release that breaks hnmix fails a CI step with its name. Resolving asks pip (`--dry-run
--report`), installs nothing, and needs the package index. `diff` also notes releases beyond
requirements.txt's caps (accelerate, torch), which neither the lock nor a fresh install tries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
HEADER = """\
# Exact versions tested together by .ci/run (Linux x86-64, Python 3.11); the ranges stay in
# requirements.txt. Install: pip install -r requirements.txt -c constraints.txt
# Written by `python tools/lock.py write`; CI's fresh-resolve step (`python tools/lock.py diff`)
# names the packages whose newer releases the lock does not have yet.
"""


def resolve(*requirement_files: str) -> dict[str, str]:
    """{normalised name: version} of a fresh install of `requirement_files`, as pip resolves it today."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        arguments = [argument for name in requirement_files for argument in ("-r", str(ROOT / name))]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--disable-pip-version-check", "--report", str(report), *arguments], check=True)
        installs = json.loads(report.read_text())["install"]
    return {normalise(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def differences(fresh: dict[str, str], lock: dict[str, str]) -> list[str]:
    """One line per package that a fresh install gets at another version than the lock, or that
    the lock lacks."""
    return [f"{name} {version} (lock: {lock.get(name, 'not pinned')})"
            for name, version in sorted(fresh.items()) if lock.get(name) != version]


def capped_requirements() -> list[str]:
    """The lines of requirements.txt with an upper bound (`<`), comments dropped."""
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if "<" in line]


def releases_beyond_the_caps() -> list[str]:
    """One note per capped requirement whose newest release on the index lies above its cap (a
    release the ranges keep out, so neither the lock nor a fresh install tests it)."""
    from packaging.requirements import Requirement  # pip's own dependency, present wherever pip runs

    notes = []
    for line in capped_requirements():
        requirement = Requirement(line)
        listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", requirement.name,
                                  "--disable-pip-version-check"], capture_output=True, text=True)
        newest = listing.stdout.split("(", 1)[1].split(")", 1)[0] if "(" in listing.stdout else None
        if newest and not requirement.specifier.contains(newest, prereleases=False):
            notes.append(f"note: {requirement.name} {newest} is out, beyond requirements.txt's {line}: "
                         "test it (DEVELOPERS.md, Dependencies) and raise the cap")
    return notes


def main(argv: list[str]) -> int:
    if argv == ["write"]:
        pins = resolve("requirements.txt", "requirements-dev.txt")
        LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        print(f"wrote {len(pins)} pins to {LOCK.name}")
        return 0
    if argv == ["diff"]:
        changed = differences(resolve("requirements.txt"), read_lock())
        print("\n".join(changed) if changed else "a fresh install of requirements.txt gets exactly the lock's versions")
        print("\n".join(releases_beyond_the_caps()))
        return 1 if changed else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
