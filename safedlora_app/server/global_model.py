"""Turn the global ArrayRecord into a real model: for central evaluation and for the saved output.

The model after round t is the round plan's :func:`~safedlora_app.core.round_plan.adapter_at` of round t:
the aggregated adapter at round t's budget.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord
from torch import nn

from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.model import build_lora_model, load_parameters, set_lora_weights
from safedlora_app.core.round_plan import adapter_at


class GlobalModel:
    """Builds the model a round ended with, reusing the base (and a trained backbone) across rounds.

    Parameters
    ----------
    base : nn.Module
        The pre-trained model with its new head.
    config : RunConfig
        The effective run config.
    module_shapes : mapping
        ``{module: (d_out, d_in)}`` of the adapted modules.
    head_modules : list of str
        The task head's module names.
    """

    def __init__(self, base: nn.Module, config: RunConfig, module_shapes: Mapping[str, tuple[int, int]],
                 head_modules: list[str]):
        self.base = base
        self.config = config
        self.module_shapes = dict(module_shapes)
        self.head_modules = head_modules
        self._backbone: tuple[str, nn.Module] | None = None

    def build(self, server_round: int, arrays: ArrayRecord, merged: bool = False) -> tuple[nn.Module, dict[str, int]]:
        """``(model, ranks)``: peft LoRA at the round's allocation, or the plain model if no LoRA yet.

        ``merged``: the LoRA update folded into the weights of a plain model (peft's
        ``merge_and_unload``), which computes the same logits without the adapter branch: for evaluation.
        """
        tensors = pl.unpack(arrays)
        base = self._base_for(tensors)
        head = pl.bare(tensors, pl.HEAD)
        if not pl.bare(tensors, pl.LORA_A):
            model = copy.deepcopy(base)
            load_parameters(model, head)
            return model, {}
        ranks, factors = adapter_at(self.config, server_round, tensors, self.module_shapes)
        model = build_lora_model(base, ranks, self.config.lora_scale, 0.0, self.head_modules)
        set_lora_weights(model, factors, head)
        return (model.merge_and_unload() if merged else model), ranks

    def ranks(self, server_round: int, arrays: ArrayRecord) -> dict[str, int]:
        """The ranks of the model after ``server_round`` (empty before any LoRA round), without building it."""
        tensors = pl.unpack(arrays)
        return adapter_at(self.config, server_round, tensors, self.module_shapes)[0] if pl.bare(
            tensors, pl.LORA_A) else {}

    def _base_for(self, tensors) -> nn.Module:
        backbone = pl.bare(tensors, pl.BACKBONE)
        if not backbone:
            return self.base
        digest = pl.tensors_hash(backbone)
        if self._backbone is None or self._backbone[0] != digest:
            model = copy.deepcopy(self.base)
            load_parameters(model, backbone)
            self._backbone = (digest, model)
        return self._backbone[1]

    def save(self, server_round: int, arrays: ArrayRecord, run_dir: Path, preprocessor, base_source: str) -> Path:
        """Save what the run produced, loadable with standard tools.

        LoRA runs: a peft adapter folder ``adapter/`` (head included via modules_to_save) for
        ``PeftModel.from_pretrained``; if the backbone was trained, it goes to ``base-model/`` and
        the adapter points there. Full fine-tuning runs: the whole model in ``model/``.
        """
        model, ranks = self.build(server_round, arrays)
        backbone_trained = bool(pl.bare(pl.unpack(arrays), pl.BACKBONE))
        if not ranks:
            target = run_dir / "model"
            model.save_pretrained(target)
            preprocessor.save_pretrained(target)
            return target
        if backbone_trained:
            base_dir = run_dir / "base-model"
            self._backbone[1].save_pretrained(base_dir)
            preprocessor.save_pretrained(base_dir)
            base_source = str(base_dir)
        model.peft_config["default"].base_model_name_or_path = base_source
        target = run_dir / "adapter"
        model.save_pretrained(target)
        return target
