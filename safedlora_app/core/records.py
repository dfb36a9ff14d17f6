"""What a message between the ServerApp and a ClientApp holds: the names of its records, and the round config every
training and evaluation message carries, written by the server and read by the nodes through one class (a module
without torch, so that the ClientApp's limits query imports nothing heavy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

#: The tensors, the metrics, what a node says about itself, its declared limits.
ARRAYS, METRICS, NODE, LIMITS = "arrays", "metrics", "node", "limits"
#: The record that holds the :class:`RoundConfig`.
CONFIG = "config"


class RoundConfigError(ValueError):
    """A message's round config lacks a key or holds a value of the wrong type (names the key)."""


@dataclass(frozen=True)
class RoundConfig:
    """The round's instructions to a node: its keys are the field names in kebab case (``server-round``, ...)."""

    server_round: int
    kind: str
    """``lora`` or ``full`` (``round_plan.LORA``, ``round_plan.FULL``)."""
    lr: float
    prox_mu: float
    wire_dtype: str
    """The payload's float type, down and up."""
    label_names: tuple[str, ...]
    backbone_hash: str = ""
    """The trained backbone a LoRA round builds on ('' = the pre-trained one)."""
    lora_modules: tuple[str, ...] = ()
    """LoRA rounds: the adapted modules, in the order of the packed factors."""
    lora_ranks: tuple[int, ...] = ()
    """LoRA rounds: each module's rank (the node checks both lists agree)."""
    lora_scale: float = 0.0
    lora_frozen_a: bool = False
    """LoRA rounds: A is not sent; the node regenerates it (``round_plan.frozen_a``), trains B only and sends B only."""

    def to_record(self) -> ConfigRecord:
        """The message's config record (the LoRA keys only in LoRA rounds)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.lora_modules:
            values = {k: v for k, v in values.items() if not k.startswith("lora-")}
        if not self.lora_frozen_a:  # only FFA-LoRA's rounds say it: every other round config is as before
            values.pop("lora-frozen-a", None)
        return ConfigRecord({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})

    @classmethod
    def from_record(cls, record: Any) -> RoundConfig:
        """Read a message's config record.

        Raises
        ------
        RoundConfigError
            Naming the key that is missing or of the wrong type.
        """
        if not isinstance(record, ConfigRecord):
            raise RoundConfigError(f"the message's {CONFIG!r} record is {type(record).__name__}, not a ConfigRecord")
        values = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                if f.default is dataclasses.MISSING:
                    raise RoundConfigError(f"the round config has no {key!r}")
                continue
            values[f.name] = _typed(key, record[key], f.type)
        return cls(**values)


def _typed(key: str, value: Any, kind: str) -> Any:
    """``value`` as the field type named ``kind`` (``from __future__`` keeps annotations as strings)."""
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind.startswith("tuple[") and isinstance(value, Sequence) and not isinstance(value, str):
        item = kind.removeprefix("tuple[").split(",")[0]
        return tuple(_typed(key, v, item) for v in value)
    raise RoundConfigError(f"the round config's {key!r} is {value!r}, not of type {kind}")
