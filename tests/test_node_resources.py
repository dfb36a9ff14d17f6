"""What a node caches: its own data file mapped to the server's labels, tokenized rows on disk, backbones."""

import pytest
import torch
from torch import nn

from safedlora_app.client import node_resources as nr
from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import DataError

LABELS = ("negative", "neutral", "positive")


@pytest.fixture
def node_csv(tmp_path):
    path = tmp_path / "local.csv"
    rows = ["text,label"] + [
        f"tweet number {i} is {'great' if i % 2 else 'awful'},{'positive' if i % 2 else 'negative'}" for i in range(12)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def config(tmp_path, **overrides):
    return RunConfig(cache_dir=str(tmp_path / "cache"), **overrides)


def test_node_local_file_uses_the_server_label_order_and_caches_tokens(tmp_path, node_csv):
    nr.clear_caches()
    first = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    # The file knows only 'negative' and 'positive' (local ids 0, 1); the server's ids are 0 and 2.
    assert sorted(set(first.data.labels.tolist())) == [0, 2]
    assert first.partition_label == f"data-path {node_csv}"
    cached = list((tmp_path / "cache" / "encoded").glob("*.safetensors"))
    assert len(cached) == 1
    nr.clear_caches()  # a fresh process: everything comes from the disk cache
    second = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    assert second.data.tokens == first.data.tokens and second.data.labels.tolist() == first.data.labels.tolist()
    node_csv.write_text(node_csv.read_text() + "one more tweet,neutral\n")  # a changed file is re-read
    nr.clear_caches()
    assert len(nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS).data) == 13


def test_missing_data_path_and_unknown_labels_are_clear_errors(tmp_path, node_csv):
    nr.clear_caches()
    with pytest.raises(DataError, match="data-path = '/nope/local.csv' does not exist on this node"):
        nr.node_resources(config(tmp_path), {"data-path": "/nope/local.csv"}, LABELS)
    with pytest.raises(DataError, match=r"labels \['positive'\] that the server does not know"):
        nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, ("negative", "neutral"))


def test_one_process_serving_many_nodes_keeps_one_model_and_a_few_partitions(tmp_path):
    """A Ray actor serves many virtual nodes: its memory must not grow with their number."""
    nr.clear_caches()
    run = config(tmp_path, partitioner="iid", test_size=100)
    served = [nr.node_resources(run, {"partition-id": k, "num-partitions": 400}, LABELS) for k in range(12)]
    assert len({id(r.base_model) for r in served}) == 1
    assert len(nr.PARTITIONS) == nr.PARTITIONS.maxsize and len(nr.MODELS) == 1
    # The most recent partitions stay cached (same object); an evicted one is reloaded from disk.
    assert nr.node_resources(run, {"partition-id": 11, "num-partitions": 400}, LABELS).data is served[11].data
    again = nr.node_resources(run, {"partition-id": 0, "num-partitions": 400}, LABELS)
    assert again.data is not served[0].data and again.data.tokens == served[0].data.tokens


@pytest.mark.parametrize("name, content, problem", [
    ("no-label.csv", "text,sentiment\nhello,positive\nbye,negative\n", r"Column 'label' not found"),
    ("empty.csv", "", r"is empty"),
    ("latin1.csv", "text,label\ncaf\xe9 ol\xe9,positive\nbye,negative\n".encode("latin-1"),
     r"is not utf-8 text \(byte b'\\xe9' at offset \d+\); save it as UTF-8"),
    ("notes.txt", "text,label\nhi,positive\n", r"extension must be one of"),
])
def test_broken_node_local_files_name_the_file_and_the_problem(tmp_path, name, content, problem):
    nr.clear_caches()
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=rf"data-path = '{path}'.*{problem}"):
        nr.node_resources(config(tmp_path), {"data-path": str(path)}, LABELS)


def test_a_tab_separated_file_is_read(tmp_path):
    nr.clear_caches()
    path = tmp_path / "local.tsv"
    path.write_text("text\tlabel\n" + "".join(f"tweet, with a comma {i}\t{LABELS[i % 3]}\n" for i in range(9)))
    resources = nr.node_resources(config(tmp_path), {"data-path": str(path)}, LABELS)
    assert len(resources.data) == 9 and sorted(set(resources.data.labels.tolist())) == [0, 1, 2]


def test_a_file_changed_within_one_process_is_read_again(tmp_path, node_csv):
    """The in-process cache and the disk cache share one key, which counts the file's content stamp."""
    nr.clear_caches()
    assert len(nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS).data) == 12
    node_csv.write_text(node_csv.read_text() + "one more tweet,neutral\n")
    assert len(nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS).data) == 13


def test_a_node_file_is_cached_once_whatever_the_partition_settings(tmp_path, node_csv):
    """Settings that cut dataset-name into partitions do not decide a data-path's rows: one cache entry."""
    nr.clear_caches()
    node = {"data-path": str(node_csv)}
    first = nr.node_resources(config(tmp_path, seed=1), node, LABELS)
    second = nr.node_resources(config(tmp_path, seed=2, partitioner="iid", test_size=7), node, LABELS)
    assert second.data is first.data and len(nr.PARTITIONS) == 1
    assert len(list((tmp_path / "cache" / "encoded").glob("*.safetensors"))) == 1


def test_the_partition_key_follows_what_decides_the_rows(tmp_path, node_csv):
    run = config(tmp_path, partitioner="iid")
    key = nr.partition_key(run, run.model_name, "", (0, 4), LABELS)
    assert key == nr.partition_key(run, run.model_name, "", (0, 4), LABELS)
    for changed in [nr.partition_key(run, run.model_name, "", (1, 4), LABELS),
                    nr.partition_key(config(tmp_path, partitioner="iid", seed=run.seed + 1), run.model_name, "",
                                     (0, 4), LABELS),
                    nr.partition_key(config(tmp_path, partitioner="iid", max_seq_len=run.max_seq_len + 8),
                                     run.model_name, "", (0, 4), LABELS),
                    nr.partition_key(run, run.model_name, "", (0, 4), LABELS[::-1]),
                    nr.partition_key(run, run.model_name, str(node_csv), (0, 4), LABELS),
                    # Review of issue #36: another validation split leaves other rows to train on.
                    nr.partition_key(config(tmp_path, partitioner="iid", val_size=run.val_size + 1), run.model_name,
                                     "", (0, 4), LABELS)]:
        assert changed != key


def test_rows_cut_by_an_older_split_are_never_reused(tmp_path, monkeypatch):
    run = config(tmp_path, partitioner="iid")
    key = nr.partition_key(run, run.model_name, "", (0, 4), LABELS)
    monkeypatch.setattr(nr, "SPLIT_VERSION", nr.SPLIT_VERSION - 1)
    assert nr.partition_key(run, run.model_name, "", (0, 4), LABELS) != key


def test_the_lru_cache_drops_the_least_recently_used_before_loading():
    cache = nr.LruCache(maxsize=2)
    loads = []

    def load(value):
        loads.append((value, len(cache)))
        return value

    assert cache.get_or_load("a", lambda: load(1)) == 1 and cache.get_or_load("b", lambda: load(2)) == 2
    assert cache.get("a") == 1  # "b" is now the least recently used
    assert cache.get_or_load("c", lambda: load(3)) == 3
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert loads[-1] == (3, 1)  # the old value went before the new one was loaded
    assert cache.get_or_load("a", lambda: load(9)) == 1 and len(loads) == 3
    cache.clear()
    assert len(cache) == 0 and cache.get("a", "none") == "none"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)


def tiny_resources() -> nr.NodeResources:
    return nr.NodeResources(base_model=Tiny(), data=None, partition_label="", model_key=("tiny",))


def test_a_received_backbone_is_checked_kept_on_disk_and_read_back_by_a_fresh_process(tmp_path):
    nr.clear_caches()
    resources, cache_dir = tiny_resources(), str(tmp_path / "cache")
    trained = {"layer.weight": torch.full((2, 2), 3.0), "layer.bias": torch.ones(2)}
    digest = pl.tensors_hash(trained)
    received = {f"{pl.BACKBONE}{pl.SEP}{name}": value for name, value in trained.items()}
    assert nr.base_with_backbone(resources, "", received, cache_dir) is resources.base_model
    with pytest.raises(pl.PayloadError, match="hashes to"):
        nr.base_with_backbone(resources, "0" * 64, received, cache_dir)
    with pytest.raises(pl.PayloadError, match="is not in cache-dir"):
        nr.base_with_backbone(resources, digest, {}, cache_dir)
    model = nr.base_with_backbone(resources, digest, received, cache_dir)
    assert torch.equal(model.layer.weight, trained["layer.weight"]) and model is not resources.base_model
    assert nr.BACKBONES.path(cache_dir, digest).is_file()
    assert list((tmp_path / "cache" / "backbones").iterdir()) == [nr.BACKBONES.path(cache_dir, digest)]
    assert nr.base_with_backbone(resources, digest, {}, cache_dir) is model  # in memory
    nr.clear_caches()  # a fresh process: built from the disk copy
    again = nr.BACKBONES.get(resources, digest, cache_dir)
    assert again is not model and torch.equal(again.layer.weight, trained["layer.weight"])
    assert nr.BACKBONES.get(resources, "f" * 64, cache_dir) is None
