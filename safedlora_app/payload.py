"""What travels in an ArrayRecord: key names and tensor <-> record conversion.

Keys are ``<kind>::<name>``:
- ``lora_A::<module>`` (r x d_in) and ``lora_B::<module>`` (d_out x r) for an adapted module,
- ``head::<parameter>`` for the task head,
- ``backbone::<parameter>`` for every other model parameter (full fine-tuning rounds, and the
  trained backbone handed once to each node after an ``init-trainable = full`` stage).

Module and parameter names are the base model's own (``named_modules``/``named_parameters``),
never peft's wrapped names, so the server needs no model to read a payload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

LORA_A, LORA_B, HEAD, BACKBONE = "lora_A", "lora_B", "head", "backbone"
SEP = "::"


def key(kind: str, name: str) -> str:
    """Wire key for a tensor of ``kind`` named ``name``."""
    return f"{kind}{SEP}{name}"


def select(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one kind, keyed by their bare name."""
    prefix = kind + SEP
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def only(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The entries of one kind, keeping their wire keys."""
    prefix = kind + SEP
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def lora_factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (B, A)}`` from a payload's lora_B/lora_A entries."""
    a, b = select(tensors, LORA_A), select(tensors, LORA_B)
    return {module: (b[module], a[module]) for module in a}


def pack(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """ArrayRecord of float32 arrays (ArrayRecord rejects bfloat16; fp32 keeps aggregation exact)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()))
                        for k, v in tensors.items()})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors from an ArrayRecord, in its key order."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash (sha256 over sorted names, shapes and fp32 bytes): identifies a backbone."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def num_parameters(record: ArrayRecord) -> int:
    """Number of values in an ArrayRecord (without deserialising)."""
    return int(sum(np.prod(arr.shape, dtype=np.int64) for arr in record.values()))
