"""Checkpoints: the global arrays and the run's state after every round, for an exact resume.

``<run dir>/checkpoint/`` holds ``round-<k>.safetensors`` (the global arrays after round k) and
``state.json``: the round, the run config, the RNG states, the SHA-256 of the arrays file, and what each
stateful part of the server returns from ``state_dict()``, as torch's modules do (the recorder's per-round
metrics lines, the strategy's node -> backbone hash, the deadline grid's longest round). Each file is
written to a temporary name and renamed: ``state.json`` is replaced last and names its arrays file, so a
crash at any moment leaves the previous checkpoint or the new one, whole. Older arrays files are removed
after the new state is in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from safedlora_app.core.files import atomic_write, atomic_write_json

FORMAT = 1
DIRECTORY, STATE = "checkpoint", "state.json"
# Run-config keys that may differ between a checkpoint and the run that resumes it (run-name: a run started
# without one is resumed by its directory's name).
RESUMABLE_KEYS = ("out-dir", "run-name", "resume", "num-server-rounds", "schedule-rounds")
REQUIRED = ("given", "records", "node-backbone", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not belong to this run config (the message names the file)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a resume starts from."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


class Stateful(Protocol):
    """A part of the server whose state a checkpoint keeps: torch's ``state_dict``/``load_state_dict`` pair,
    with JSON values under keys of its own (they become ``state.json``'s top-level keys)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def collect(parts: Iterable[Stateful]) -> dict[str, Any]:
    """The parts' states merged into one document for :func:`save`.

    Raises
    ------
    ValueError
        When two parts return the same key (one would silently overwrite the other on resume).
    """
    state: dict[str, Any] = {}
    for part in parts:
        own = part.state_dict()
        if clash := state.keys() & own.keys():
            raise ValueError(f"{type(part).__name__}.state_dict() returns {sorted(clash)}, already another part's")
        state.update(own)
    return state


def restore(point: Checkpoint, parts: Iterable[Stateful]) -> None:
    """Give each part its state from ``point``, and the process its RNG states."""
    for part in parts:
        part.load_state_dict(point.state)
    restore_rng(point.state["rng"])


def save(run_dir: Path, server_round: int, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> Path:
    """Write the checkpoint after ``server_round`` (see the module docstring); returns the state file."""
    folder = run_dir / DIRECTORY
    folder.mkdir(parents=True, exist_ok=True)
    arrays = folder / f"round-{server_round:05d}.safetensors"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(arrays, lambda partial: save_file(cpu, str(partial)))
    document = {"format": FORMAT, "round": server_round, "arrays": arrays.name, "arrays-sha256": _sha256(arrays),
                "rng": rng_states(), **state}
    path = folder / STATE
    try:
        atomic_write_json(path, document, indent=1)
    except Exception:  # atomic_write raises only before its rename: the state in place names the previous arrays
        arrays.unlink(missing_ok=True)  # free this one's space
        raise
    for old in folder.glob("round-*.safetensors"):
        if old != arrays:
            old.unlink(missing_ok=True)
    return path


def load(run_dir: Path) -> Checkpoint:
    """The checkpoint of ``run_dir``; every problem raises ``CheckpointError`` naming the file."""
    path = run_dir / DIRECTORY / STATE
    if not path.exists():
        raise CheckpointError(f"resume = true, but {path} does not exist: this run directory holds no checkpoint "
                              "(set resume = false and choose a new run-name to start a run)")
    try:
        state = json.loads(path.read_text())
        arrays = path.parent / state["arrays"]
        expected, server_round = state["arrays-sha256"], int(state["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}; this version reads format {FORMAT}")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} is corrupt or truncated: it lacks {', '.join(missing)}")
    if not arrays.exists():
        raise CheckpointError(f"{arrays} (named by {path}) does not exist")
    if _sha256(arrays) != expected:
        raise CheckpointError(f"{arrays} is corrupt or truncated: its SHA-256 differs from the one in {path}")
    try:
        tensors = load_file(str(arrays))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{arrays} cannot be read ({error})") from None
    return Checkpoint(server_round, tensors, state)


def last_good(run_dir: Path) -> str:
    """What a user can resume from after a failed write: the round of ``run_dir``'s checkpoint, checked whole
    (:func:`load`), and how to continue; never raises."""
    if not (run_dir / DIRECTORY / STATE).exists():
        return "No checkpoint was written yet: fix the cause (e.g. free disk space) and start the run again."
    try:
        point = load(run_dir)
    except Exception as error:  # noqa: BLE001 - the message is the answer
        return f"The checkpoint cannot be resumed from: {error}."
    return (f"The checkpoint after round {point.server_round} in {run_dir / DIRECTORY} is intact: "
            "fix the cause (e.g. free disk space), then run again with resume = true and "
            f"run-name = {run_dir.name!r} to continue from it.")


def contradictions(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Run-config keys whose value differs from the checkpoint's, other than ``RESUMABLE_KEYS``."""
    return [f"{key} = {given.get(key)!r} (the checkpoint has {value!r})" for key, value in saved.items()
            if key not in RESUMABLE_KEYS and given.get(key) != value]


def rng_states() -> dict[str, str]:
    """The server process's global RNG states (Python and torch), base64-encoded."""
    return {"python": base64.b64encode(json.dumps(_jsonable(random.getstate())).encode()).decode(),
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def restore_rng(states: Mapping[str, str]) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = json.loads(base64.b64decode(states["python"]))
    random.setstate((version, tuple(internal), gauss))
    raw = base64.b64decode(states["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


