"""Named sets of run-config values: the profiles a user picks with one key (``profile = "accurate"``), and
the choices each method fixes (``RunConfig.effective``).

The app's defaults are the lean point (at least fixed-rank LoRA's accuracy at under half its bytes). A profile
trades bytes for accuracy; its measured cost and accuracy are in the README. A profile's values apply to the
keys a run does not give: a key given any value keeps it, even the app's default
(``profile = "accurate" lr = 0.003``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Every Linear layer of a BERT-style encoder (MiniLM): attention query/key/value, and ``dense`` for the
#: attention output, both feed-forward layers and the pooler.
ALL_LINEAR = "query,key,value,dense"

#: The modules and ranks of the ``accurate`` profile: the lab's arm ``sa-all-r16`` runs them (a test checks it).
ACCURATE_ADAPTER = {"target-modules": ALL_LINEAR, "rank-max": 16, "rank-min": 8}

#: profile -> run-config values it sets.
PROFILES: dict[str, dict[str, Any]] = {
    # LoRA on every Linear layer (37 modules on MiniLM instead of 12), rank 16 annealed to 8, at the rate the
    # comparison's search chose for it (x0.5 of 3e-3). The number of rounds is the run's: the comparison runs
    # this profile as it is, at the same rounds as full fine-tuning (docs/comparison.md).
    "accurate": {**ACCURATE_ADAPTER, "lr": 1.5e-3},
}

#: The low-memory node profile: the ``--node-config`` of a SuperNode on a small board (docs/edge-devices.md).
#: Optimiser steps on 16 samples as by default (4 x 4 accumulated) with a quarter of the activations, one
#: thread, and 48 tokens (most tweets: p99 is 50). docker/compose.node.yml sets it (tests/test_docker_files.py).
LOW_MEMORY_NODE = {"batch-size": 4, "grad-accum-steps": 4, "torch-threads": 1, "max-seq-len": 48}


def node_config_text(values: dict[str, Any]) -> str:
    """``values`` as ``--node-config`` text: ``key=value`` pairs, strings in single quotes.

    Raises
    ------
    TypeError
        For a value that text would not read back as written (a bool, a string with a quote, another type).
    """
    def text(key: str, value: Any) -> str:
        if isinstance(value, str) and "'" not in value:
            return f"{key}='{value}'"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key}={value}"
        raise TypeError(f"node-config {key} = {value!r}: only numbers and strings without single quotes")

    return " ".join(text(k, v) for k, v in values.items())


#: method -> the run-config values it fixes, over the user's (a function of the config: ``RunConfig``).
#: ``fedit`` is LoRA at a fixed rank with A and B averaged separately; ``fedavg``/``fedprox`` fine-tune the
#: full model every round (fedavg without the proximal term).
_FIXED_RANK = {"init-rounds": 0, "schedule": "constant", "allocation": "uniform", "aggregation": "factors",
               "prox-mu-anneal": 0.0, "heat-rounds": 0, "cool-rounds": 0}
METHOD_PRESETS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "sa-fedlora": lambda config: {},
    "fedit": lambda config: dict(_FIXED_RANK),
    # FFA-LoRA (Sun et al., ICLR 2024): fedit's fixed rank with A frozen (``RunConfig.frozen_a``).
    "ffa-lora": lambda config: dict(_FIXED_RANK),
    "fedavg": lambda config: {"init-rounds": config.num_server_rounds, "init-trainable": "full", "prox-mu": 0.0},
    "fedprox": lambda config: {"init-rounds": config.num_server_rounds, "init-trainable": "full"},
}
