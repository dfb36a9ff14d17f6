"""One set of tested versions: constraints.txt against pyproject.toml, this environment and a drift."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pins  # scripts/pins.py (pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]


def project_requirements():
    """Every requirement of the app and its extras (an extra naming the app itself, as test names lab, left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [req for r in project["dependencies"] + extras if (req := Requirement(r)).name != project["name"]]


def test_this_environment_is_the_pinned_one():
    """The suite runs on exactly the tested versions; `pins.py check` says the same in .ci/run."""
    assert pins.drift(pins.read(), pins.installed()) == []


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins.read()
    for requirement in project_requirements():
        version = pins.pinned_version(pinned, requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes the pin {version}"
    assert pins.pinned_version(pinned, "ray")  # flwr[simulation]'s engine is pinned too


def test_app_ranges_are_capped():
    """Users resolve compatible ranges, never an unbounded next major release."""
    for requirement in project_requirements():
        if requirement.name == "packaging":  # used by scripts/pins.py only; any modern release parses pins
            continue
        assert any(s.operator == "<" for s in requirement.specifier), f"{requirement} has no upper bound"


def test_drift_names_each_package(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# comment\nflwr==1.42.0\ntorch==2.13.0\nray==2.55.1  # trailing\n"
                           "pywin32==311 ; sys_platform == 'win32'\n")
    present = {"flwr": "1.41.0", "torch": "2.13.0+cpu", "uv": "0.13.9", "safedlora-app": "0.1.0",
               "nvidia-cublas-cu12": "12.8.4.1", "triton": "3.5.0"}  # a CUDA torch's runtime follows torch
    assert pins.drift(pins.read(constraints), present) == [
        "flwr: pinned 1.42.0, installed 1.41.0",
        "ray: pinned 2.55.1, not installed",
        "uv: installed 0.13.9, not pinned (an unpinned dependency can drift)",
    ]


@pytest.mark.parametrize("line, message", [
    ("torch>=2.4", "not an exact pin"),
    ("flwr==1.42.0\nFLWR==1.41.0", "pinned twice"),
])
def test_read_rejects_what_is_not_one_exact_pin(tmp_path, line, message):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        pins.read(constraints)


def test_freeze_round_trips_and_drops_local_labels():
    present = {"torch": "2.13.0+cpu", "flwr": "1.42.0", "safedlora-app": "0.1.0", "pip": "26.3"}
    text = pins.freeze(present)
    assert "torch==2.13.0\n" in text and "safedlora" not in text and "pip==" not in text
    path = ROOT / "constraints.txt"
    assert {canonicalize_name(n) for n in pins.read(path)} == set(pins.read(path))  # names canonical


def test_check_exits_nonzero_with_the_package_named(monkeypatch, capsys):
    drifted = {**pins.installed(), "flwr": "1.0.0"}
    monkeypatch.setattr(pins, "installed", lambda: drifted)
    assert pins.main(["check"]) == 1
    assert "flwr: pinned" in capsys.readouterr().err


def test_pytest_xdist_keeps_a_group_on_one_worker(tmp_path):
    """The slow tiers rely on `--dist loadgroup` (one Docker build, one Flower simulation at a time). pytest 9.2
    keeps node ids where pytest-xdist 3.8 cannot rename them, and the groups were then ignored in silence."""
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.xdist_group('probe')\n"
        + "".join(f"def test_{k}():\n    pass\n" for k in range(4)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                          "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    workers = set(re.findall(r"\[(gw\d+)\] .*PASSED", out.stdout))
    assert out.returncode == 0 and len(workers) == 1, out.stdout[-2000:]
