"""The wire format: array key names, and tensor <-> record conversion.

A train message holds the ArrayRecord under ``records.ARRAYS`` and the round's config; a reply holds its
ArrayRecord under ``ARRAYS``, its MetricRecord under ``METRICS`` and what the node reports about
itself (the backbone it trained on, its data) under ``NODE`` (the record names live in :mod:`records`,
which imports no torch).

Keys are ``<kind>::<name>``:
- ``lora_A::<module>`` (r x d_in) and ``lora_B::<module>`` (d_out x r) for an adapted module,
- ``head::<parameter>`` for the task head,
- ``backbone::<parameter>`` for every other model parameter (full fine-tuning rounds, and the
  trained backbone handed once to each node after an ``init-trainable = full`` stage).
Floating-point buffers (BatchNorm's running statistics) travel with the parameters, under ``head::``
when their module is the head's (``model.full_state``).

Module, parameter and buffer names are the base model's own (``named_modules``/``named_parameters``/
``named_buffers``), never peft's wrapped names, so the server needs no model to read a payload.

Every message and reply carries its floating-point tensors in the run's ``wire-dtype`` (float16 by
default), full rounds included; the trained backbone handed to a node for a LoRA round is the one
exception: it travels as float32, the exact tensors the server hashed and evaluates with.

On the wire (messages to and from nodes) every LoRA factor travels in one flat array,
``lora::packed``: for each module in the round's module order, B then A, row-major. Both sides
know the layout from the round's ranks and the modules' shapes, and one array instead of two per
module spares each message the per-array header (~130 bytes of npy header and key each), about 4%
of a message at rank 1 to 3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord

from safedlora_app.core.checks import is_integer

LORA_A, LORA_B, HEAD, BACKBONE = "lora_A", "lora_B", "head", "backbone"
SEP = "::"
PACKED = "lora::packed"


class PayloadError(ValueError):
    """A payload does not have the layout the round announced."""


def key(kind: str, name: str) -> str:
    """Wire key for a tensor of ``kind`` named ``name``."""
    return f"{kind}{SEP}{name}"


def bare(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one kind, keyed by their bare name."""
    prefix = kind + SEP
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def of_kind(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The entries of one kind, keeping their wire keys."""
    prefix = kind + SEP
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def lora_factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (B, A)}`` from a payload's lora_B/lora_A entries."""
    a, b = bare(tensors, LORA_A), bare(tensors, LORA_B)
    return {module: (b[module], a[module]) for module in a}


def pack(tensors: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """ArrayRecord of ``dtype`` arrays: ``float32`` (the global model: aggregation stays exact) or ``float16``
    (run-config ``wire-dtype``, for what travels; ArrayRecord takes no bfloat16)."""
    kind = {"float32": torch.float32, "float16": torch.float16}[dtype]
    return ArrayRecord({k: v.detach().to("cpu", kind).contiguous() for k, v in tensors.items()})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors from an ArrayRecord, in its key order (each its own writable copy)."""
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def announced_ranks(modules: Sequence[str], ranks: Sequence[int]) -> dict[str, int]:
    """``{module: rank}`` from a round config's ``lora-modules`` and ``lora-ranks`` lists, checked.

    Raises
    ------
    PayloadError
        When the lists differ in length, a module repeats, or a rank is not a positive whole number.
    """
    modules, ranks = list(modules), list(ranks)
    if len(modules) != len(ranks):
        raise PayloadError(f"the round announces {len(modules)} LoRA modules but {len(ranks)} ranks")
    if len(set(modules)) != len(modules):
        raise PayloadError(f"the round announces a LoRA module twice: {modules}")
    bad = [r for r in ranks if not is_integer(r) or r < 1]
    if bad:
        raise PayloadError(f"LoRA ranks must be whole numbers >= 1; the round announces {bad}")
    return dict(zip(modules, ranks))


def _wire_kinds(frozen_a: bool) -> tuple[str, ...]:
    return (LORA_B,) if frozen_a else (LORA_B, LORA_A)


def to_wire(tensors: Mapping[str, torch.Tensor], modules: Sequence[str], frozen_a: bool = False
            ) -> dict[str, torch.Tensor]:
    """Replace the lora_B/lora_A entries of ``modules`` by one flat ``lora::packed`` tensor (B then A each; B alone
    with ``frozen_a``, whose A entries are left out: both sides know A)."""
    factor_keys = {key(kind, m) for m in modules for kind in (LORA_B, LORA_A)}
    out = {k: v for k, v in tensors.items() if k not in factor_keys}
    if modules:
        out[PACKED] = torch.cat([tensors[key(kind, m)].detach().to("cpu", torch.float32).reshape(-1)
                                 for m in modules for kind in _wire_kinds(frozen_a)])
    return out


def packed_size(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], frozen_a: bool = False) -> int:
    """Values in ``lora::packed`` for ``{module: rank}`` and ``{module: (d_out, d_in)}`` (B alone with
    ``frozen_a``)."""
    return sum(r * (shapes[m][0] + (0 if frozen_a else shapes[m][1])) for m, r in ranks.items())


def from_wire(tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              shapes: Mapping[str, tuple[int, int]], frozen_a: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of ``to_wire``: split ``lora::packed`` into lora_B/lora_A entries at ``ranks`` (in their order;
    lora_B alone with ``frozen_a``).

    Raises
    ------
    PayloadError
        When ``lora::packed`` is missing although ranks were announced, or has another length.
    """
    out = {k: v for k, v in tensors.items() if k != PACKED}
    if not ranks:
        return out
    if PACKED not in tensors:
        raise PayloadError(f"no {PACKED!r} although the round has LoRA ranks")
    flat = tensors[PACKED].reshape(-1)
    expected = packed_size(ranks, shapes, frozen_a)
    if flat.numel() != expected:
        raise PayloadError(f"{PACKED} holds {flat.numel()} values; the announced ranks need {expected}")
    offset = 0
    for m, r in ranks.items():
        d_out, d_in = shapes[m]
        out[key(LORA_B, m)] = flat[offset:offset + d_out * r].reshape(d_out, r)
        offset += d_out * r
        if not frozen_a:
            out[key(LORA_A, m)] = flat[offset:offset + r * d_in].reshape(r, d_in)
            offset += r * d_in
    return out


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
