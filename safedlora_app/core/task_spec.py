"""What the run config knows of each task without loading its code: its name, the held-out metrics its evaluation
reports, whether it classifies (class names and a head), and the defaults it gives the keys a run leaves at theirs.

The tasks' code (data, rows, model, evaluation) is in :mod:`safedlora_app.tasks`, one module per task; its
``register`` adds a new task's spec here, so that the config of that process knows it. The specs stay free of torch
and datasets: a node answers the server's limits query with a config and nothing else, so a built-in task's spec is
listed here as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """One task as the run config sees it."""

    name: str
    """The run-config ``task`` value."""
    eval_metrics: tuple[str, ...]
    """What every evaluated model (central, federated) reports on held-out rows; a node's evaluation reply must
    hold each of them."""
    classifies: bool = True
    """Class labels: the run needs class names (from the data or ``label-names``) and a head (``head-modules``)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Values for the keys a run leaves at theirs, applied before a profile (a key given any value keeps it). Only
    keys that ``pyproject.toml`` declares as ``"default"`` can have them (``config.PRESET_KEYS``)."""


#: The LoRA targets of LLaMA-style decoders (LLaMA, Qwen, SmolLM, Mistral): the attention projections and the MLP.
LLAMA_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

CLASSIFICATION_METRICS = ("accuracy", "macro-f1", "loss")
TEXT_CLASSIFICATION = TaskSpec("text-classification", CLASSIFICATION_METRICS)
IMAGE_CLASSIFICATION = TaskSpec("image-classification", CLASSIFICATION_METRICS)
#: A language model's held-out loss is the mean cross-entropy per response token, and perplexity its exponential.
#: The defaults fit SmolLM2-135M on 2 CPU cores (docs/causal-lm.md): 8 rounds of 2 nodes, 8 steps of 4 replies each
#: per round, the held-out loss on 128 replies of conversations no node holds. The budget falls from rank 8 right
#: after the initiating round to 1 per module for the last 3 rounds: 44% of fixed-rank 8's bytes as planned (a
#: floor of 2 sent 54%: global allocation gives the large MLP projections the rank). FlexLoRA's factor split ended
#: 0.020 lower in held-out loss than the balanced one, paired over 5 seeds.
CAUSAL_LM = TaskSpec(
    "causal-lm", ("loss", "perplexity"), classifies=False,
    defaults={"target-modules": LLAMA_LINEAR, "head-modules": "", "max-seq-len": 128, "batch-size": 4,
              "local-samples": 32, "lr": 1e-3, "test-size": 128, "val-size": 0, "eval-batch-size": 16,
              "num-server-rounds": 8, "rank-min": 1, "heat-fraction": 0.0, "cool-fraction": 0.4,
              "factor-form": "orthonormal-a"})

#: task name -> its spec: the built-in tasks, and those registered since (:func:`safedlora_app.tasks.register`).
TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, CAUSAL_LM)}
