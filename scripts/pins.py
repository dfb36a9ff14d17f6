"""The tested versions in constraints.txt: check an environment against them, or write them.

    python scripts/pins.py check     exit 1, naming each package, if this environment drifted
    python scripts/pins.py freeze    rewrite constraints.txt from this environment

`pyproject.toml` keeps compatible ranges, so that `pip install safedlora-app` resolves for users;
constraints.txt pins the whole resolved stack (direct and transitive) at the versions the test
suite passed with. The README's commands, `.ci/run` and both Docker images install through it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
# Not part of the stack: the app itself (installed editable from this checkout) and the
# installer, whose version does not change what gets installed once every package is pinned.
UNPINNED = {"safedlora-app", "pip"}
# What a CUDA build of torch brings along (its runtime libraries); which of them, and at which version, depends on
# the torch build (+cpu brings none), so they follow the torch pin instead of being pinned themselves.
TORCH_BUILD_PREFIXES = ("nvidia-", "triton", "cuda-")

HEADER = """\
# The versions the test suite passed with: the whole stack, direct and transitive dependencies.
# Every install goes through this file (README, .ci/run, docker/Dockerfile, docker/Dockerfile.jetson):
#   pip install -c constraints.txt torch && pip install -c constraints.txt -e ".[test]"
# Upgrade: change one line (e.g. flwr==X.Y.Z), reinstall in a fresh venv, run pytest. If pip reports
# a conflict, install without this file and run `python scripts/pins.py freeze` to rewrite it.
# `python scripts/pins.py check` (run by .ci/run) fails when the environment differs from it.
# torch is pinned without its local label (+cpu, +cu128): either build satisfies the pin.
"""


def read(path: Path = CONSTRAINTS) -> dict[str, Requirement]:
    """Parse a constraints file into {canonical name: requirement}; every line must be `name==version`."""
    pins: dict[str, Requirement] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"{path.name}:{number}: {line!r} is not an exact pin (name==version)")
        name = canonicalize_name(requirement.name)
        if name in pins:
            raise ValueError(f"{path.name}:{number}: {requirement.name} is pinned twice")
        pins[name] = requirement
    return pins


def pinned_version(pins: dict[str, Requirement], name: str) -> str:
    """The exact version `name` is pinned to (KeyError naming the package if it is not)."""
    try:
        return next(iter(pins[canonicalize_name(name)].specifier)).version
    except KeyError:
        raise KeyError(f"{name} is not pinned in {CONSTRAINTS.name}") from None


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def public(version: str) -> str:
    """The version without its local label: torch 2.13.0+cpu satisfies torch==2.13.0."""
    return Version(version).public


def drift(pins: dict[str, Requirement], present: dict[str, str]) -> list[str]:
    """Every difference between the pins and an environment, one readable line each."""
    problems = []
    for name, requirement in sorted(pins.items()):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        want = pinned_version(pins, name)
        if name not in present:
            problems.append(f"{name}: pinned {want}, not installed")
        elif public(present[name]) != want:
            problems.append(f"{name}: pinned {want}, installed {present[name]}")
    for name, version in sorted(present.items()):
        if name not in pins and name not in UNPINNED and not name.startswith(TORCH_BUILD_PREFIXES):
            problems.append(f"{name}: installed {version}, not pinned (an unpinned dependency can drift)")
    return problems


def freeze(present: dict[str, str]) -> str:
    lines = [f"{name}=={public(version)}" for name, version in sorted(present.items()) if name not in UNPINNED]
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "freeze"], nargs="?", default="check")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        CONSTRAINTS.write_text(freeze(installed()))
        print(f"wrote {CONSTRAINTS} ({len(read())} packages)")
        return 0
    problems = drift(read(), installed())
    if problems:
        print(f"This environment differs from {CONSTRAINTS.name} (the tested versions):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("Install with `-c constraints.txt` in a fresh venv (see the README), or, to upgrade on purpose, "
              "edit constraints.txt and rerun the tests.", file=sys.stderr)
        return 1
    print(f"{len(read())} packages match {CONSTRAINTS.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
