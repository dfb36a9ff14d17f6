"""The comparison's arms: one TOML file each in ``safedlora_lab/arms/``, as Flower's baselines keep theirs.

An arm is a name (its file's stem) and the run-config keys it sets over the comparison's settings::

    description = "LoRA at fixed rank-max, A/B averaged (FedIT)"   # the tables' notes
    user-name = "fixed-rank LoRA"     # optional: what a user knows it as (plot legends)
    lr = "own"                        # "own": the lr search searches it; else the arm whose searched rate it
                                      # takes (default "sa-fedlora")
    headline = true                   # optional: every seed on the headline splits (default false)
    reference = true                  # optional: byte savings are reported against it (default false); the
                                      # tables have a column for each of fedavg and fedit-rmax, the two that say so
    paired-against = ["fedavg"]       # optional: the protocol's claims, this arm minus each, paired by seed

    [run-config]
    method = "fedit"                  # "{rank-min}" in a value is replaced by the comparison's rank-min

A new arm is a new file. Pure (reads files, runs nothing).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARMS_DIR = Path(__file__).resolve().parents[1] / "arms"
#: Where an arm's ``lr`` is missing: the SA-FedLoRA variants take sa-fedlora's searched rate.
DEFAULT_LR_SOURCE = "sa-fedlora"
_KEYS = {"description", "user-name", "lr", "headline", "reference", "paired-against", "run-config"}


class ArmError(ValueError):
    """An arm file that cannot be used; the message names the file, the value and what is allowed."""


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison (see the module docstring for each field)."""

    name: str
    description: str
    run_config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    user_name: str | None = None
    lr: str = DEFAULT_LR_SOURCE
    headline: bool = False
    reference: bool = False
    paired_against: tuple[str, ...] = ()

    @property
    def full_model(self) -> bool:
        """Whether every round fine-tunes the whole model (its rate is ``full-lr``)."""
        return self.run_config.get("method") in ("fedavg", "fedprox")

    @property
    def lr_source(self) -> str:
        """The arm whose searched learning rate this arm uses (itself for ``lr = "own"``)."""
        return self.name if self.lr == "own" else self.lr


def read_arm(path: Path) -> Arm:
    """The arm in ``path`` (its name is the file's stem)."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ArmError(f"{path}: not TOML ({error})") from None
    if unknown := sorted(set(data) - _KEYS):
        raise ArmError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("description"), str) or not data["description"]:
        raise ArmError(f"{path}: description must be a non-empty string")
    run_config = data.get("run-config", {})
    if not isinstance(run_config, dict) or any(isinstance(v, (dict, list)) for v in run_config.values()):
        raise ArmError(f"{path}: [run-config] must hold run-config keys with a number, string or boolean each")
    pairs = data.get("paired-against", [])
    if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
        raise ArmError(f"{path}: paired-against must be a list of arm names")
    for key, kind, what in (("user-name", str, "a string"), ("lr", str, "'own' or an arm's name"),
                            ("headline", bool, "true or false"), ("reference", bool, "true or false")):
        if key in data and not isinstance(data[key], kind):
            raise ArmError(f"{path}: {key} = {data[key]!r} is not allowed; it must be {what}")
    return Arm(name=path.stem, description=data["description"], run_config=run_config,
               user_name=data.get("user-name"), lr=str(data.get("lr", DEFAULT_LR_SOURCE)),
               headline=bool(data.get("headline", False)), reference=bool(data.get("reference", False)),
               paired_against=tuple(pairs))


def load_arms(folder: Path = ARMS_DIR) -> dict[str, Arm]:
    """Every ``*.toml`` arm in ``folder``, by name (sorted), checked against each other: an ``lr`` or
    ``paired-against`` naming an arm that does not exist, or an ``lr`` source that does not search its own rate,
    is an error."""
    arms = {path.stem: read_arm(path) for path in sorted(Path(folder).glob("*.toml"))}
    if not arms:
        raise ArmError(f"no arm (*.toml) in {folder}")
    for arm in arms.values():
        if arm.lr != "own" and arms.get(arm.lr, Arm("", "", lr="")).lr != "own":
            raise ArmError(f"{folder / arm.name}.toml: lr = {arm.lr!r} must be 'own' or an arm with lr = 'own' "
                           f"({', '.join(a.name for a in arms.values() if a.lr == 'own')})")
        if missing := [p for p in arm.paired_against if p not in arms]:
            raise ArmError(f"{folder / arm.name}.toml: paired-against names no arm: {', '.join(missing)}")
    return arms
