"""constraints.txt, the tested set of exact versions, agrees with requirements.txt's ranges, and
tools/lock.py names what a fresh install would get beyond it."""

from packaging.requirements import Requirement

from tools import lock


def requirements() -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in (lock.ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_the_lock_pins_every_requirement_within_its_range():
    pins = lock.read_lock()
    for requirement in requirements():
        version = pins.get(lock.normalise(requirement.name))
        assert version is not None, f"constraints.txt does not pin {requirement.name}: python tools/lock.py write"
        assert requirement.specifier.contains(version), f"constraints.txt's {requirement.name}=={version} is outside {requirement}"


def test_accelerate_and_torch_are_capped():
    """A new minor release of either changed behaviour hnmix depends on before (accelerate 1.16's launcher)."""
    capped = {requirement.name for requirement in requirements() if any(spec.operator == "<" for spec in requirement.specifier)}
    assert {"torch", "accelerate"} <= capped


def test_differences_name_each_new_or_unpinned_package():
    lock_pins = {"accelerate": "1.16.0", "timm": "1.0.31"}
    fresh = {"accelerate": "1.16.1", "timm": "1.0.31", "newdep": "0.1"}
    assert lock.differences(fresh, lock_pins) == ["accelerate 1.16.1 (lock: 1.16.0)", "newdep 0.1 (lock: not pinned)"]
    assert lock.differences(lock_pins, lock_pins) == []


def test_names_are_compared_in_pips_normal_form(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# a comment\nHuggingFace_Hub==2.4.0\nruamel.yaml==0.18.0  # trailing\n\n")
    assert lock.read_lock(path) == {"huggingface-hub": "2.4.0", "ruamel-yaml": "0.18.0"}
